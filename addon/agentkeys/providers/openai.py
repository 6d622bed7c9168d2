"""OpenAI's wire format: chat completions, streaming and not, and the free model list."""

import fnmatch
import json

from agentkeys.pricing import Usage
from agentkeys.providers.base import (
    DenyKind,
    MalformedRequest,
    RequestFacts,
    SseEvent,
    StreamResult,
    event_json,
    optional_positive_int,
    parse_json_object,
    required_model,
)
from agentkeys.tokens import count_tokens

METERED = [("POST", "/v1/chat/completions")]
FREE = [("GET", "/v1/models"), ("GET", "/v1/models/*")]

# OpenAI's documented chat overhead: 3 tokens per message, 1 per name, 3 to prime the reply.
TOKENS_PER_MESSAGE = 4
REPLY_PRIMING_TOKENS = 3
# A high-detail image costs at most 8 tiles; on gpt-4o-mini that is 2,833 + 8 × 5,667 tokens.
IMAGE_TOKEN_ALLOWANCE = 50_000
# Tool definitions are rewritten by OpenAI into a system prompt of its own; allow for it.
TOOLS_OVERHEAD_TOKENS = 1_000

ERRORS = {
    DenyKind.UNAUTHENTICATED: (401, "invalid_request_error", "invalid_api_key"),
    DenyKind.FORBIDDEN: (403, "permission_error", "forbidden"),
    DenyKind.BUDGET: (429, "insufficient_quota", "insufficient_quota"),
    DenyKind.BAD_REQUEST: (400, "invalid_request_error", "invalid_request"),
    DenyKind.UNAVAILABLE: (503, "server_error", "store_unavailable"),
    DenyKind.INTERNAL: (500, "server_error", "proxy_error"),
}


class OpenAIFormat:
    name = "openai"

    def endpoint_kind(self, method: str, path: str) -> str | None:
        for kind, endpoints in (("metered", METERED), ("free", FREE)):
            if any(m == method and fnmatch.fnmatchcase(path, p) for m, p in endpoints):
                return kind
        return None

    def request_facts(self, method: str, path: str, body: bytes) -> RequestFacts:
        if self.endpoint_kind(method, path) != "metered":
            return RequestFacts(metered=False)
        data = parse_json_object(body)
        model = required_model(data)
        messages = data.get("messages")
        if not isinstance(messages, list) or not messages:
            raise MalformedRequest("'messages' must be a non-empty list")
        stream = data.get("stream") is True
        stream_options = data.get("stream_options") or {}
        return RequestFacts(
            metered=True,
            model=model,
            max_output_tokens=optional_positive_int(data, "max_completion_tokens", "max_tokens"),
            choices=optional_positive_int(data, "n") or 1,
            stream=stream,
            input_token_bound=chat_input_bound(model, messages, data.get("tools") or data.get("functions")),
            client_wants_stream_usage=bool(isinstance(stream_options, dict) and stream_options.get("include_usage")),
        )

    def upstream_body(self, facts: RequestFacts, body: bytes, cap_output_tokens: int | None) -> bytes | None:
        """The body to forward, or None to forward it as sent.

        Adds the output cap the hold assumed, and asks for usage in a stream whose client did not.
        """
        ask_usage = facts.stream and not facts.client_wants_stream_usage
        if cap_output_tokens is None and not ask_usage:
            return None
        data = json.loads(body)
        if cap_output_tokens is not None:
            data["max_completion_tokens"] = cap_output_tokens
        if ask_usage:
            data["stream_options"] = {**(data.get("stream_options") or {}), "include_usage": True}
        return json.dumps(data).encode()

    def usage_from_response(self, body: bytes) -> Usage | None:
        try:
            usage = json.loads(body).get("usage")
        except (ValueError, AttributeError):
            return None
        return usage_from_object(usage)

    def stream_meter(self, facts: RequestFacts) -> "ChatStreamMeter":
        return ChatStreamMeter(hide_usage_chunk=not facts.client_wants_stream_usage)

    def error(self, kind: DenyKind, message: str) -> tuple[int, dict]:
        status, error_type, code = ERRORS[kind]
        return status, {"error": {"message": message, "type": error_type, "param": None, "code": code}}

    def set_real_key(self, headers, key: str) -> None:
        headers["authorization"] = f"Bearer {key}"


def usage_from_object(usage) -> Usage | None:
    if not isinstance(usage, dict) or "prompt_tokens" not in usage:
        return None
    prompt_details = usage.get("prompt_tokens_details") or {}
    completion_details = usage.get("completion_tokens_details") or {}
    return Usage(
        input_tokens=usage.get("prompt_tokens") or 0,
        output_tokens=usage.get("completion_tokens") or 0,
        cached_tokens=prompt_details.get("cached_tokens") or 0,
        reasoning_tokens=completion_details.get("reasoning_tokens") or 0,
    )


def chat_input_bound(model: str, messages: list, tools) -> int:
    """An upper bound on the prompt tokens OpenAI will bill for these messages.

    Text is counted with the model's own tiktoken encoding; images get the most any image can cost.
    """
    tokens = REPLY_PRIMING_TOKENS
    for message in messages:
        if not isinstance(message, dict):
            raise MalformedRequest("each message must be an object")
        tokens += TOKENS_PER_MESSAGE
        for value in message.values():
            tokens += content_tokens(model, value)
    if tools:
        tokens += TOOLS_OVERHEAD_TOKENS + count_tokens(json.dumps(tools), model)
    return tokens


def content_tokens(model: str, value) -> int:
    if isinstance(value, str):
        return count_tokens(value, model)
    if isinstance(value, list):
        return sum(content_part_tokens(model, part) for part in value)
    if isinstance(value, dict):
        return count_tokens(json.dumps(value), model)
    return 0


def content_part_tokens(model: str, part) -> int:
    if isinstance(part, dict) and part.get("type") in ("image_url", "input_image", "image"):
        return IMAGE_TOKEN_ALLOWANCE
    if isinstance(part, dict) and part.get("type") in ("file", "input_file"):
        raise MalformedRequest(
            "file parts (PDFs and other documents) cannot be bounded in tokens before the call,"
            " so they cannot be metered by this proxy yet"
        )
    if isinstance(part, dict) and isinstance(part.get("text"), str):
        return count_tokens(part["text"], model) + 1
    return count_tokens(json.dumps(part), model)


class ChatStreamMeter:
    """Reads a chat completion stream: the text so far, and the usage chunk at the end.

    When the proxy asked for usage on the client's behalf, that extra chunk is not passed on.
    """

    def __init__(self, hide_usage_chunk: bool):
        self.hide_usage_chunk = hide_usage_chunk
        self.usage: Usage | None = None
        self.done = False
        self.text_parts: list[str] = []

    def feed(self, event: SseEvent) -> bool:
        if event.data.strip() == "[DONE]":
            self.done = True
            return True
        chunk = event_json(event)
        if chunk is None:
            return True
        for choice in chunk.get("choices") or []:
            self._collect_text(choice.get("delta") or {})
        usage = usage_from_object(chunk.get("usage"))
        if usage is None:
            return True
        self.usage = usage
        return not (self.hide_usage_chunk and not chunk.get("choices"))

    def _collect_text(self, delta: dict) -> None:
        for text in (delta.get("content"), delta.get("refusal"), delta.get("reasoning_content")):
            if isinstance(text, str):
                self.text_parts.append(text)
        for call in delta.get("tool_calls") or []:
            function = call.get("function") or {}
            self.text_parts.append((function.get("name") or "") + (function.get("arguments") or ""))

    def result(self) -> StreamResult:
        return StreamResult(
            usage=self.usage, complete=self.done and self.usage is not None, streamed_text="".join(self.text_parts)
        )


FORMAT = OpenAIFormat()
