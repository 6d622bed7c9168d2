"""Anthropic's wire format: messages, streaming and not, and the free token counter.

Anthropic's tokenizer is not public, so the input bound is the UTF-8 byte count of the text:
every token of a byte-level BPE is at least one byte, whatever the vocabulary.
"""

import json

from agentkeys.pricing import Usage
from agentkeys.providers.base import (
    DenyKind,
    MalformedRequest,
    RequestFacts,
    SseEvent,
    StreamResult,
    Unmeterable,
    UsageRejected,
    event_json,
    has_key,
    kind_of_endpoint,
    optional_positive_int,
    parse_json_object,
    required_model,
    usage_count,
    usage_object,
    utf8_len,
)
from agentkeys.providers.documents import inline_document_tokens

MESSAGES = "/v1/messages"
METERED = [("POST", MESSAGES)]
FREE = [("POST", "/v1/messages/count_tokens"), ("GET", "/v1/models"), ("GET", "/v1/models/*")]

TOKENS_PER_MESSAGE = 8
REQUEST_OVERHEAD_TOKENS = 16
# Images are resized by Anthropic to about 1.15 megapixels (~1,600 tokens); allow generously.
IMAGE_TOKEN_ALLOWANCE = 5_000
# Tool use adds a system prompt of Anthropic's own (a few hundred tokens).
TOOLS_OVERHEAD_TOKENS = 1_000
# Tools the client runs itself cost only tokens. Server tools (web search, web fetch, code execution)
# are billed per use and add input the request does not show.
CLIENT_TOOL_TYPE_PREFIXES = ("custom", "bash_", "text_editor_", "computer_", "memory_")

ERRORS = {
    DenyKind.UNAUTHENTICATED: (401, "authentication_error"),
    DenyKind.FORBIDDEN: (403, "permission_error"),
    DenyKind.BUDGET: (402, "billing_error"),
    DenyKind.RATE_LIMITED: (429, "rate_limit_error"),
    DenyKind.LOOP: (429, "rate_limit_error"),
    DenyKind.BAD_REQUEST: (400, "invalid_request_error"),
    DenyKind.TOO_LARGE: (413, "request_too_large"),
    DenyKind.UNAVAILABLE: (503, "api_error"),
    DenyKind.NOT_CONFIGURED: (500, "api_error"),
    DenyKind.NOT_FOUND: (404, "not_found_error"),
    DenyKind.INTERNAL: (500, "api_error"),
}


class AnthropicFormat:
    name = "anthropic"

    def endpoint_kind(self, method: str, path: str) -> str | None:
        return kind_of_endpoint(method, path, METERED, FREE)

    def request_facts(self, method: str, path: str, body: bytes, query: str = "", exact: bool = False) -> RequestFacts:
        """`exact` changes nothing here: this format's texts are bounded by their bytes."""
        if self.endpoint_kind(method, path) != "metered":
            return RequestFacts(metered=False)
        data = parse_json_object(body)
        model = required_model(data)
        max_tokens = optional_positive_int(data, "max_tokens")
        if max_tokens is None:
            raise MalformedRequest("'max_tokens' is required")
        messages = data.get("messages")
        if not isinstance(messages, list) or not messages:
            raise MalformedRequest("'messages' must be a non-empty list")
        check_client_tools(data)
        unseen: set[str] = set()
        return RequestFacts(
            metered=True,
            endpoint=MESSAGES,
            model=model,
            max_output_tokens=max_tokens,
            stream=data.get("stream") is True,
            input_token_bound=messages_input_bound(data, messages, unseen),
            unseen_input=", ".join(sorted(unseen)) or None,
            # Anthropic writes a prompt cache (at a premium) only where a request marks a breakpoint:
            # looked for in the parsed body, where `cache\u005fcontrol` is `cache_control` too.
            may_write_cache=has_key(data, "cache_control"),
        )

    def upstream_body(self, facts: RequestFacts, body: bytes, cap_output_tokens: int | None) -> bytes | None:
        """As sent, unless the budget clamped `max_tokens` (which the request always carries)."""
        if cap_output_tokens is None:
            return None
        return json.dumps({**json.loads(body), "max_tokens": cap_output_tokens}).encode()

    def usage_from_response(self, body: bytes) -> Usage | None:
        try:
            usage = json.loads(body).get("usage")
        except (ValueError, AttributeError):
            return None
        return usage_from_object(usage)

    def stored_response(self, facts: RequestFacts, body: bytes) -> None:
        """This provider keeps no response for a later call to continue."""
        return None

    def stream_meter(self, facts: RequestFacts) -> "MessagesStreamMeter":
        return MessagesStreamMeter()

    def error(self, kind: DenyKind, message: str) -> tuple[int, dict]:
        status, error_type = ERRORS[kind]
        return status, {"type": "error", "error": {"type": error_type, "message": message}}

    def real_key_header(self, key: str) -> tuple[str, str]:
        return "x-api-key", key


def usage_from_object(usage, output_tokens=None) -> Usage | None:
    """Anthropic reports cache reads and writes apart from `input_tokens`; we count them in.

    Writes to the one-hour cache cost more than to the five-minute one; `cache_creation` splits them.
    `output_tokens`, when given, is a stream's final count (from `message_delta`). Counts that are
    not sane raise UsageRejected.
    """
    if not isinstance(usage, dict) or "input_tokens" not in usage:
        return None
    if output_tokens is not None:
        usage = {**usage, "output_tokens": output_tokens}
    cached = usage_count(usage, "cache_read_input_tokens")
    written = usage_count(usage, "cache_creation_input_tokens")
    written_1h = usage_count(usage_object(usage, "cache_creation"), "ephemeral_1h_input_tokens")
    return Usage(
        input_tokens=usage_count(usage, "input_tokens") + cached + written,
        output_tokens=usage_count(usage, "output_tokens"),
        cached_tokens=cached,
        cache_write_tokens=written,
        cache_write_1h_tokens=min(written_1h, written),
    )


def check_client_tools(data: dict) -> None:
    if data.get("mcp_servers"):
        raise Unmeterable(
            "MCP servers are called by Anthropic and add input of their own, so this proxy cannot meter them"
        )
    for tool in data.get("tools") or []:
        kind = (tool.get("type") or "custom") if isinstance(tool, dict) else None
        if not isinstance(kind, str) or not kind.startswith(CLIENT_TOOL_TYPE_PREFIXES):
            raise Unmeterable(
                f"the server tool {kind!r} is billed per use, beyond tokens, so this proxy cannot meter it"
            )


def messages_input_bound(data: dict, messages: list, unseen: set[str]) -> int:
    """A bound on the input tokens; a document only Anthropic can read (by URL or file id) goes into `unseen`."""
    tokens = REQUEST_OVERHEAD_TOKENS + len(messages) * TOKENS_PER_MESSAGE
    tokens += block_tokens(data.get("system") or "", unseen)
    for message in messages:
        if not isinstance(message, dict):
            raise MalformedRequest("each message must be an object")
        tokens += block_tokens(message.get("content") or "", unseen)
    if data.get("tools"):
        tokens += TOOLS_OVERHEAD_TOKENS + utf8_len(data["tools"])
    return tokens


def block_tokens(content, unseen: set[str]) -> int:
    if isinstance(content, str):
        return utf8_len(content)
    if not isinstance(content, list):
        return utf8_len(content)
    tokens = 0
    for block in content:
        if not isinstance(block, dict):
            tokens += utf8_len(block) + TOKENS_PER_MESSAGE
        elif block.get("type") == "image":
            tokens += IMAGE_TOKEN_ALLOWANCE
        elif block.get("type") == "document":
            tokens += document_tokens(block, unseen)
        elif isinstance(block.get("content"), list):  # tool results carry blocks of their own
            others = {k: v for k, v in block.items() if k != "content"}
            tokens += block_tokens(block["content"], unseen) + utf8_len(others)
        elif isinstance(block.get("text"), str):
            tokens += utf8_len(block["text"]) + TOKENS_PER_MESSAGE
        else:
            tokens += utf8_len(block) + TOKENS_PER_MESSAGE
    return tokens


def document_tokens(block: dict, unseen: set[str]) -> int:
    """A `document` block: plain text by its bytes, a base64 PDF by its pages (documents.py), blocks of
    custom content as blocks; by URL or file id, only Anthropic sees it."""
    source = block.get("source")
    if not isinstance(source, dict):
        raise MalformedRequest("a 'document' block needs a 'source' object")
    others = utf8_len({k: v for k, v in block.items() if k != "source"}) + TOKENS_PER_MESSAGE
    kind = source.get("type")
    if kind == "content" and isinstance(source.get("content"), list | str):
        return others + block_tokens(source["content"], unseen)
    if kind == "text" and isinstance(source.get("data"), str):
        return others + utf8_len(source["data"])
    tokens = None
    if kind == "base64" and isinstance(source.get("data"), str):
        tokens = inline_document_tokens(source.get("media_type"), source["data"], IMAGE_TOKEN_ALLOWANCE)
    if tokens is None:
        unseen.add("document")
        tokens = 0
    return others + tokens


# The stream events the meter reads: the usage at the start and near the end, and the end itself.
METERED_EVENTS = frozenset({"message_start", "message_delta", "message_stop"})


class MessagesStreamMeter:
    """Reads a messages stream: input usage from `message_start`, output from `message_delta`.

    An event named (by its `event:` line) as one that carries neither is not parsed: the content
    deltas, one per few tokens, cost nothing to read.
    """

    def __init__(self):
        self.start_usage: dict | None = None
        self.output_tokens: int | None = None

    def feed(self, event: SseEvent) -> bool:
        if event.event is not None and event.event not in METERED_EVENTS:
            return True
        data = event_json(event)
        if data is None:
            return True
        kind = data.get("type")
        if kind == "message_start":
            self.start_usage = (data.get("message") or {}).get("usage")
        elif kind == "message_delta":
            self.output_tokens = (data.get("usage") or {}).get("output_tokens", self.output_tokens)
        return True

    def result(self) -> StreamResult:
        """The usage, once both halves arrived; a start whose figures are not sane rejects the stream's."""
        try:
            started = usage_from_object(self.start_usage)
            if started is None or self.output_tokens is None:
                return StreamResult(usage=None)
            return StreamResult(usage=usage_from_object(self.start_usage, self.output_tokens))
        except UsageRejected as e:
            return StreamResult(usage=None, usage_rejected=str(e))


FORMAT = AnthropicFormat()
