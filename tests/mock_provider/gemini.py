"""Gemini's generateContent: the model and the action in the path, the key in ``x-goog-api-key``,
thinking billed as output, streams as server-sent events (``?alt=sse``)."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

from mock_provider.call import Call, limited, sse

if TYPE_CHECKING:
    from mock_provider.server import MockProvider

# Tokens a call inherits from the cached content it names (`cachedContent`): input the proxy cannot see.
CACHED_CONTENT_TOKENS = 1000
PATH = re.compile(r"^/v1(?:beta|alpha)?/models/(?P<model>[^/:]+):(?P<action>\w+)$")


def authorized(headers: dict[str, str], mock_provider: MockProvider) -> bool:
    return headers.get("x-goog-api-key") == mock_provider.gemini_key


class GenerateContent:
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
    def call(cls, body: dict, count: Callable[[str], int], output_tokens: int, cache: set[str] | None = None) -> Call:
        config = body.get("generationConfig") or {}
        thinking = ((config.get("thinkingConfig") or {}).get("thinkingBudget") or 0) > 0
        n, reasoning, truncated = limited(config.get("maxOutputTokens"), output_tokens, thinking)
        cached = CACHED_CONTENT_TOKENS if body.get("cachedContent") else 0
        choices = config.get("candidateCount") or 1
        return Call(
            body["model"], cls.input_tokens(body, count) + cached, n * choices, truncated,
            body.get("stream") is True, cached_tokens=cached, reasoning_tokens=reasoning * choices, choices=choices,
        )  # fmt: skip

    @staticmethod
    def usage(call: Call) -> dict:
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
    def candidate(call: Call, index: int, text: str, finished: bool) -> dict:
        part = {"text": text}
        if call.tool_call and finished:
            part = {"functionCall": {"name": call.tool_call[0], "args": json.loads(call.tool_call[1])}}
        candidate = {"content": {"parts": [part], "role": "model"}, "index": index}
        if finished:
            candidate["finishReason"] = "MAX_TOKENS" if call.truncated else "STOP"
        return candidate

    @classmethod
    def completion(cls, call: Call, body: dict | None = None) -> dict:
        candidates = [cls.candidate(call, i, call.text, True) for i in range(call.choices)]
        return {"candidates": candidates, "usageMetadata": cls.usage(call), "modelVersion": call.model}

    @classmethod
    def stream(cls, call: Call, body: dict) -> tuple[list[bytes], list[bytes], list[bytes]]:
        """Each chunk carries the prompt count so far; only the last has the whole usage and a finish reason."""
        so_far = {"promptTokenCount": call.input_tokens, "totalTokenCount": call.input_tokens}

        def chunk(piece: str) -> bytes:
            return sse({"candidates": [cls.candidate(call, 0, piece, False)], "usageMetadata": so_far})

        content = [chunk(piece) for piece in call.pieces]
        last = {"candidates": [cls.candidate(call, 0, "", True)], "usageMetadata": cls.usage(call)}
        return [], content, [sse({**last, "modelVersion": call.model})]
