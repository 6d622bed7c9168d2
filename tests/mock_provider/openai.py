"""OpenAI's wire formats: chat completions, the Responses API, legacy completions and embeddings.

Every one takes the key as ``Authorization: Bearer`` and answers errors in OpenAI's shape; each class
turns a request body into a ``Call`` (the tokens billed) and renders the reply, whole or as a stream.
"""

from __future__ import annotations

import base64
import dataclasses
import struct
import time
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

from mock_provider.call import Call, limited, sse, text_of

if TYPE_CHECKING:
    from mock_provider.server import MockProvider


def authorized(headers: dict[str, str], mock_provider: MockProvider) -> bool:
    keys = (mock_provider.openai_key, *mock_provider.extra_openai_keys)
    return headers.get("authorization") in {f"Bearer {key}" for key in keys}


def cache_read(body: dict, input_tokens: int, cache: set[str] | None) -> int:
    """OpenAI's automatic prompt cache: a ``prompt_cache_key`` seen before reads half the input."""
    key = body.get("prompt_cache_key")
    if cache is None or not isinstance(key, str):
        return 0
    seen = f"openai:{key}" in cache
    cache.add(f"openai:{key}")
    return input_tokens // 2 if seen else 0


class Chat:
    """OpenAI chat completions: auth, errors, token accounting and replies."""

    name = "openai"

    _ERROR_TYPES: ClassVar[dict[int, tuple[str, str | None]]] = {
        401: ("invalid_request_error", "invalid_api_key"),
        429: ("requests", "rate_limit_exceeded"),
    }

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
    def call(body: dict, count: Callable[[str], int], output_tokens: int, cache: set[str] | None = None) -> Call:
        # OpenAI's documented formula: 3 tokens per message plus the tokens of
        # its role, content and name (+1 for a name), plus 3 priming the reply.
        input_tokens = 3
        for message in body["messages"]:
            input_tokens += 3 + count(str(message.get("role", ""))) + count(text_of(message.get("content")))
            if "name" in message:
                input_tokens += 1 + count(str(message["name"]))
        limit = body.get("max_completion_tokens", body.get("max_tokens"))
        n, reasoning, truncated = limited(limit, output_tokens, "reasoning_effort" in body)
        return Call(
            body["model"], input_tokens, n, truncated, body.get("stream") is True,
            cached_tokens=cache_read(body, input_tokens, cache), reasoning_tokens=reasoning,
        )  # fmt: skip

    @staticmethod
    def usage(call: Call) -> dict:
        return {
            "prompt_tokens": call.input_tokens,
            "completion_tokens": call.output_tokens,
            "total_tokens": call.input_tokens + call.output_tokens,
            "prompt_tokens_details": {"cached_tokens": call.cached_tokens},
            "completion_tokens_details": {"reasoning_tokens": call.reasoning_tokens},
        }

    @staticmethod
    def finish_reason(call: Call) -> str:
        return "tool_calls" if call.tool_call else "length" if call.truncated else "stop"

    @staticmethod
    def tool_calls(call: Call) -> list[dict]:
        name, arguments = call.tool_call
        return [{"id": f"call_mock{uuid.uuid4().hex[:16]}", "type": "function",
                 "function": {"name": name, "arguments": arguments}}]  # fmt: skip

    @classmethod
    def completion(cls, call: Call, body: dict | None = None) -> dict:
        message = {"role": "assistant", "content": call.text, "refusal": None}
        if call.tool_call:
            message = {**message, "content": None, "tool_calls": cls.tool_calls(call)}
        return {
            "id": f"chatcmpl-mock{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": call.model,
            "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": cls.finish_reason(call)}],
            "usage": cls.usage(call),
        }

    @classmethod
    def stream(cls, call: Call, body: dict) -> tuple[list[bytes], list[bytes], list[bytes]]:
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
            return sse({**base, "choices": [choice], **extra})

        head = [chunk({"role": "assistant", "content": "", "refusal": None})]
        content = [chunk({"content": piece}) for piece in call.pieces]
        if call.tool_call:
            [tool] = cls.tool_calls(call)
            arguments = tool["function"]["arguments"]
            tool["function"]["arguments"] = ""
            content = [chunk({"tool_calls": [{"index": 0, **tool}]})]
            content += [chunk({"tool_calls": [{"index": 0, "function": {"arguments": arguments}}]})]
        tail = [chunk({}, cls.finish_reason(call))]
        if include_usage:
            tail.append(sse({**base, "choices": [], "usage": cls.usage(call)}))
        tail.append(sse("[DONE]"))
        return head, content, tail


def _event(kind: str, **data: Any) -> bytes:
    """A typed stream event, ``event: kind`` and ``{"type": kind, ...}``, as the Responses API sends them."""
    return sse({"type": kind, **data}, event=kind)


class Responses:
    """OpenAI's Responses API: chat's auth, errors and token counts; input items; typed stream events."""

    name = "openai"
    error = Chat.error

    @staticmethod
    def invalid(body: Any) -> str | None:
        if not isinstance(body, dict):
            return "We could not parse the JSON body of your request."
        if not isinstance(body.get("model"), str):
            return "you must provide a model parameter"
        if not isinstance(body.get("input"), str | list) and not (
            body.get("previous_response_id") or body.get("conversation")
        ):
            return "Missing required parameter: 'input'."
        if body.get("max_output_tokens") is not None and not isinstance(body["max_output_tokens"], int):
            return "Invalid type for 'max_output_tokens': expected an integer."
        return None

    @staticmethod
    def call(body: dict, count: Callable[[str], int], output_tokens: int, cache: set[str] | None = None) -> Call:
        # As chat: 3 per message plus its role and text, 3 priming the reply; instructions are a system message.
        given = body.get("input")
        items = [{"role": "user", "content": given}] if isinstance(given, str) else list(given or [])
        if isinstance(body.get("instructions"), str):
            items.insert(0, {"role": "system", "content": body["instructions"]})
        input_tokens = 3 + sum(3 + count(str(i.get("role", ""))) + count(text_of(i.get("content"))) for i in items)
        n, reasoning, truncated = limited(body.get("max_output_tokens"), output_tokens, "reasoning" in body)
        return Call(
            body["model"], input_tokens, n, truncated, body.get("stream") is True,
            cached_tokens=cache_read(body, input_tokens, cache), reasoning_tokens=reasoning,
        )  # fmt: skip

    @staticmethod
    def usage(call: Call) -> dict:
        return {
            "input_tokens": call.input_tokens,
            "input_tokens_details": {"cached_tokens": call.cached_tokens},
            "output_tokens": call.output_tokens,
            "output_tokens_details": {"reasoning_tokens": call.reasoning_tokens},
            "total_tokens": call.input_tokens + call.output_tokens,
        }

    @staticmethod
    def message(call: Call, item_id: str, text: str, status: str) -> dict:
        content = [{"type": "output_text", "text": text, "annotations": []}] if status == "completed" else []
        return {"type": "message", "id": item_id, "status": status, "role": "assistant", "content": content}

    @staticmethod
    def function_call(call: Call, item_id: str, arguments: str, status: str) -> dict:
        return {"type": "function_call", "id": item_id, "call_id": f"call_{item_id}", "name": call.tool_call[0],
                "arguments": arguments, "status": status}  # fmt: skip

    @classmethod
    def response(cls, call: Call, response_id: str, item_id: str, done: bool) -> dict:
        output = []
        if call.reasoning_tokens:
            output.append({"type": "reasoning", "id": f"rs_mock{response_id}", "summary": []})
        if done and call.tool_call:
            output.append(cls.function_call(call, item_id, call.tool_call[1], "completed"))
        elif done:
            output.append(cls.message(call, item_id, call.text, "completed"))
        return {
            "id": response_id, "object": "response", "created_at": int(time.time()), "model": call.model,
            "status": ("incomplete" if call.truncated else "completed") if done else "in_progress",
            "incomplete_details": {"reason": "max_output_tokens"} if done and call.truncated else None,
            "error": None, "output": output, "parallel_tool_calls": True, "tool_choice": "auto", "tools": [],
            "usage": cls.usage(call) if done else None,
        }  # fmt: skip

    @classmethod
    def completion(cls, call: Call, body: dict | None = None) -> dict:
        return cls.response(call, f"resp_mock{uuid.uuid4().hex}", f"msg_mock{uuid.uuid4().hex}", done=True)

    @classmethod
    def stream(cls, call: Call, body: dict) -> tuple[list[bytes], list[bytes], list[bytes]]:
        response_id, item_id = f"resp_mock{uuid.uuid4().hex}", f"msg_mock{uuid.uuid4().hex}"
        numbers = iter(range(10**9))
        where = {"item_id": item_id, "output_index": 0, "content_index": 0}

        def event(kind: str, **data: Any) -> bytes:
            return _event(kind, sequence_number=next(numbers), **data)

        started = [
            event("response.created", response=cls.response(call, response_id, item_id, done=False)),
            event("response.in_progress", response=cls.response(call, response_id, item_id, done=False)),
        ]
        done = cls.response(call, response_id, item_id, done=True)
        if call.tool_call:
            arguments = {"item_id": item_id, "output_index": 0}
            head = [*started, event("response.output_item.added", output_index=0,
                                    item=cls.function_call(call, item_id, "", "in_progress"))]  # fmt: skip
            content = [event("response.function_call_arguments.delta", **arguments, delta=call.tool_call[1])]
            tail = [
                event("response.function_call_arguments.done", **arguments, arguments=call.tool_call[1]),
                event("response.output_item.done", output_index=0, item=done["output"][-1]),
                event("response.completed", response=done),
            ]
            return head, content, tail
        head = [
            *started,
            event("response.output_item.added", output_index=0, item=cls.message(call, item_id, "", "in_progress")),
            event("response.content_part.added", **where, part={"type": "output_text", "text": "", "annotations": []}),
        ]
        content = [event("response.output_text.delta", **where, delta=piece) for piece in call.pieces]
        tail = [
            event("response.output_text.done", **where, text=call.text),
            event("response.content_part.done", **where, part=done["output"][-1]["content"][0]),
            event("response.output_item.done", output_index=0, item=done["output"][-1]),
            event("response.incomplete" if call.truncated else "response.completed", response=done),
        ]
        return head, content, tail


class Compact:
    """`POST /v1/responses/compact`: a conversation compacted into one opaque item, billed as a model call.

    It takes no output limit: the compacted item is the model's own length (the mock's output tokens).
    """

    name = "openai"
    error = Chat.error
    invalid = Responses.invalid
    usage = Responses.usage

    @staticmethod
    def call(body: dict, count: Callable[[str], int], output_tokens: int, cache: set[str] | None = None) -> Call:
        return dataclasses.replace(
            Responses.call({**body, "max_output_tokens": None}, count, output_tokens), stream=False
        )

    @classmethod
    def completion(cls, call: Call, body: dict | None = None) -> dict:
        item = {
            "type": "compaction",
            "id": f"cmp_mock{uuid.uuid4().hex}",
            "encrypted_content": "x" * call.output_tokens,
        }
        return {
            "id": f"resp_mock{uuid.uuid4().hex}", "object": "response.compaction", "created_at": int(time.time()),
            "output": [item], "usage": cls.usage(call),
        }  # fmt: skip


def _one_or_many(given: Any) -> list:
    """OpenAI's `prompt`/`input`: a text, a list of token ids, or a list of either, as a list of items."""
    if isinstance(given, str) or (isinstance(given, list) and given and isinstance(given[0], int)):
        return [given]
    return list(given) if isinstance(given, list) else []


class Completions:
    """OpenAI's legacy completions: one or more prompts, ``n`` choices each, 16 tokens unless told otherwise."""

    name = "openai"
    error = Chat.error
    usage = Chat.usage

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
    def call(cls, body: dict, count: Callable[[str], int], output_tokens: int, cache: set[str] | None = None) -> Call:
        prompts = cls.prompts(body)
        input_tokens = sum(count(p) if isinstance(p, str) else len(p) for p in prompts)
        per_choice, _, truncated = limited(body.get("max_tokens", 16), output_tokens, False)
        choices = len(prompts) * (body.get("n") or 1)
        return Call(body["model"], input_tokens, per_choice * choices, truncated, body.get("stream") is True,
                     choices=choices)  # fmt: skip

    @staticmethod
    def choice(call: Call, index: int, text: str, finished: bool) -> dict:
        finish = ("length" if call.truncated else "stop") if finished else None
        return {"text": text, "index": index, "logprobs": None, "finish_reason": finish}

    @classmethod
    def completion(cls, call: Call, body: dict | None = None) -> dict:
        return {
            "id": f"cmpl-mock{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
            "model": call.model, "choices": [cls.choice(call, i, call.text, True) for i in range(call.choices)],
            "usage": cls.usage(call),
        }  # fmt: skip

    @classmethod
    def stream(cls, call: Call, body: dict) -> tuple[list[bytes], list[bytes], list[bytes]]:
        base = {"id": f"cmpl-mock{uuid.uuid4().hex}", "object": "text_completion", "created": 0, "model": call.model}
        content = [
            sse({**base, "choices": [cls.choice(call, i, piece, False)]})
            for i in range(call.choices)
            for piece in call.pieces
        ]
        tail = [sse({**base, "choices": [cls.choice(call, i, "", True) for i in range(call.choices)]})]
        if (body.get("stream_options") or {}).get("include_usage") is True:
            tail.append(sse({**base, "choices": [], "usage": cls.usage(call)}))
        return [], content, [*tail, sse("[DONE]")]


class Embeddings:
    """OpenAI's embeddings: input tokens only; vectors as floats or, as the SDK asks by default, base64."""

    name = "openai"
    error = Chat.error
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
    def call(cls, body: dict, count: Callable[[str], int], output_tokens: int, cache: set[str] | None = None) -> Call:
        tokens = sum(count(i) if isinstance(i, str) else len(i) for i in cls.inputs(body))
        return Call(body["model"], tokens, 0, False, False)

    @classmethod
    def completion(cls, call: Call, body: dict | None = None) -> dict:
        packed = base64.b64encode(struct.pack(f"<{len(cls.VECTOR)}f", *cls.VECTOR)).decode()
        vector = packed if (body or {}).get("encoding_format") == "base64" else list(cls.VECTOR)
        data = [{"object": "embedding", "index": i, "embedding": vector} for i in range(len(cls.inputs(body or {})))]
        usage = {"prompt_tokens": call.input_tokens, "total_tokens": call.input_tokens}
        return {"object": "list", "data": data, "model": call.model, "usage": usage}


APIS = {
    "/v1/chat/completions": Chat,
    "/v1/responses": Responses,
    "/v1/responses/compact": Compact,
    "/v1/completions": Completions,
    "/v1/embeddings": Embeddings,
}
