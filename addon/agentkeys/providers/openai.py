"""OpenAI's wire format: chat completions, the Responses API, legacy completions and embeddings,
streaming and not, and the free reads (models, stored responses, input token counts).

Azure OpenAI sends the same bodies on other paths: `azure.py` maps its paths onto these endpoints.
"""

import json
import re

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
    kind_of_endpoint,
    optional_positive_int,
    parse_json_object,
    required_model,
    set_output_cap,
    usage_count,
    usage_object,
    utf8_len,
)
from agentkeys.tokens import TextBound, text_bound

CHAT = "/v1/chat/completions"
RESPONSES = "/v1/responses"
COMPLETIONS = "/v1/completions"
EMBEDDINGS = "/v1/embeddings"
METERED = [("POST", CHAT), ("POST", RESPONSES), ("POST", COMPLETIONS), ("POST", EMBEDDINGS)]
FREE = [
    ("GET", "/v1/models"),
    ("GET", "/v1/models/*"),
    ("GET", "/v1/responses/*"),  # a stored response
    ("GET", "/v1/responses/*/input_items"),
    ("DELETE", "/v1/responses/*"),
    ("POST", "/v1/responses/input_tokens"),
]
# Where each endpoint takes its output limit, preferred field first.
CAP_FIELDS = {
    CHAT: ("max_completion_tokens", "max_tokens"),
    RESPONSES: ("max_output_tokens",),
    COMPLETIONS: ("max_tokens",),
}
# Legacy completions stop at 16 tokens unless told otherwise; the proxy writes that limit out (see upstream_body).
COMPLETIONS_DEFAULT_MAX_TOKENS = 16

# OpenAI's documented chat overhead: 3 tokens per message, 1 per name, 3 to prime the reply.
TOKENS_PER_MESSAGE = 4
REPLY_PRIMING_TOKENS = 3
# A high-detail image costs at most 8 tiles; on gpt-4o-mini that is 2,833 + 8 × 5,667 tokens.
IMAGE_TOKEN_ALLOWANCE = 50_000
# Tool definitions and structured-output schemas are rewritten by OpenAI into a system prompt of its own.
TOOLS_OVERHEAD_TOKENS = 1_000
# Tools the client runs itself: they cost only tokens. Hosted ones (web search, file search, code
# interpreter, image generation, MCP, …) are billed per use and bring in input of their own.
CLIENT_TOOL_TYPES = {"function", "custom", "computer_use_preview", "local_shell", "apply_patch"}
# Service tiers billed at the standard prices or less; `priority` costs more than the price table says.
STANDARD_SERVICE_TIERS = {None, "auto", "default", "flex"}

ERRORS = {
    DenyKind.UNAUTHENTICATED: (401, "invalid_request_error", "invalid_api_key"),
    DenyKind.FORBIDDEN: (403, "permission_error", "forbidden"),
    DenyKind.BUDGET: (429, "insufficient_quota", "insufficient_quota"),
    DenyKind.BAD_REQUEST: (400, "invalid_request_error", "invalid_request"),
    DenyKind.TOO_LARGE: (413, "invalid_request_error", "request_too_large"),
    DenyKind.UNAVAILABLE: (503, "server_error", "store_unavailable"),
    DenyKind.NOT_CONFIGURED: (500, "server_error", "provider_not_configured"),
    DenyKind.NOT_FOUND: (404, "invalid_request_error", "not_found"),
    DenyKind.INTERNAL: (500, "server_error", "proxy_error"),
}


class OpenAIFormat:
    name = "openai"

    def endpoint_kind(self, method: str, path: str) -> str | None:
        return kind_of_endpoint(method, path, METERED, FREE)

    def request_facts(self, method: str, path: str, body: bytes, query: str = "", exact: bool = False) -> RequestFacts:
        if self.endpoint_kind(method, path) != "metered":
            return RequestFacts(metered=False)
        return read_endpoint(path, parse_json_object(body), exact)

    def upstream_body(self, facts: RequestFacts, body: bytes, cap_output_tokens: int | None) -> bytes | None:
        """The body to forward, or None to forward it as sent.

        Writes the output cap the hold assumed (always, on legacy completions, whose implicit default
        another OpenAI-compatible host may not share), and asks for usage in a stream whose client did not.
        """
        if facts.endpoint == COMPLETIONS and cap_output_tokens is None:
            cap_output_tokens = facts.max_output_tokens
        ask_usage = facts.stream and not facts.client_wants_stream_usage
        if cap_output_tokens is None and not ask_usage:
            return None
        data = json.loads(body)
        if cap_output_tokens is not None:
            set_output_cap(data, cap_output_tokens, CAP_FIELDS[facts.endpoint])
        if ask_usage:
            data["stream_options"] = {**(data.get("stream_options") or {}), "include_usage": True}
        return json.dumps(data).encode()

    def usage_from_response(self, body: bytes) -> Usage | None:
        try:
            usage = json.loads(body).get("usage")
        except (ValueError, AttributeError):
            return None
        return usage_from_object(usage)

    def stream_meter(self, facts: RequestFacts) -> "ChatStreamMeter | ResponsesStreamMeter":
        if facts.endpoint == RESPONSES:
            return ResponsesStreamMeter()
        return ChatStreamMeter(hide_usage_chunk=not facts.client_wants_stream_usage)

    def error(self, kind: DenyKind, message: str) -> tuple[int, dict]:
        status, error_type, code = ERRORS[kind]
        return status, {"error": {"message": message, "type": error_type, "param": None, "code": code}}

    def real_key_header(self, key: str) -> tuple[str, str]:
        return "authorization", f"Bearer {key}"


def read_endpoint(endpoint: str, data: dict, exact: bool) -> RequestFacts:
    """The facts of a metered call on one of the endpoints above (Azure's paths map onto them too);
    `exact`: count every text with the model's tokenizer, however long."""
    if data.get("service_tier") not in STANDARD_SERVICE_TIERS:
        tier = data["service_tier"]
        raise Unmeterable(f"service tier {tier!r} is billed above the standard prices, so this proxy cannot meter it")
    return READERS[endpoint](data, exact)


def read_chat(data: dict, exact: bool) -> RequestFacts:
    model = required_model(data)
    count = text_bound(model, exact)
    messages = data.get("messages")
    if not isinstance(messages, list) or not messages:
        raise MalformedRequest("'messages' must be a non-empty list")
    if data.get("web_search_options") is not None:
        raise Unmeterable("web search is billed per search, beyond tokens, so this proxy cannot meter it")
    if data.get("prediction") is not None:
        raise Unmeterable(
            "a prediction's rejected tokens are billed as output beyond max_tokens, so this proxy cannot bound it"
        )
    if "audio" in (data.get("modalities") or []) or has_audio_input(messages):
        raise Unmeterable("audio tokens are priced apart from text, so this proxy cannot meter them yet")
    stream_options = stream_options_of(data)
    return RequestFacts(
        metered=True,
        endpoint=CHAT,
        model=model,
        max_output_tokens=optional_positive_int(data, "max_completion_tokens", "max_tokens"),
        choices=optional_positive_int(data, "n") or 1,
        stream=data.get("stream") is True,
        input_token_bound=chat_input_bound(count, messages, data),
        client_wants_stream_usage=bool(stream_options.get("include_usage")),
    )


def read_responses(data: dict, exact: bool) -> RequestFacts:
    model = required_model(data)
    count = text_bound(model, exact)
    if data.get("background") is True:
        raise Unmeterable("a background response is billed after the call returns, so this proxy cannot meter it")
    unseen = set()
    tokens = REPLY_PRIMING_TOKENS + instructions_tokens(count, data) + tools_tokens(count, data.get("tools"))
    tokens += schema_tokens(count, (data.get("text") or {}).get("format"))
    given = data.get("input")
    if isinstance(given, str):
        tokens += TOKENS_PER_MESSAGE + count(given)
    elif isinstance(given, list):
        tokens += sum(response_item_tokens(count, item, unseen) for item in given)
    elif given is not None:
        raise MalformedRequest("'input' must be a string or a list of items")
    for field in ("previous_response_id", "conversation", "prompt"):
        if data.get(field):
            unseen.add(field)
    if given is None and not unseen:
        raise MalformedRequest("the request has no 'input'")
    return RequestFacts(
        metered=True,
        endpoint=RESPONSES,
        model=model,
        max_output_tokens=optional_positive_int(data, "max_output_tokens"),
        stream=data.get("stream") is True,
        input_token_bound=tokens,
        unseen_input=", ".join(sorted(unseen)) or None,
    )


def read_completions(data: dict, exact: bool) -> RequestFacts:
    model = required_model(data)
    count = text_bound(model, exact)
    prompts, tokens = prompt_tokens(count, data.get("prompt"), "prompt")
    if isinstance(data.get("suffix"), str):
        tokens += prompts * count(data["suffix"])
    max_tokens = optional_positive_int(data, "max_tokens") or COMPLETIONS_DEFAULT_MAX_TOKENS
    # `best_of` completions are generated (and billed) server-side; `n` of them are returned.
    per_prompt = max(optional_positive_int(data, "n") or 1, optional_positive_int(data, "best_of") or 1)
    stream_options = stream_options_of(data)
    return RequestFacts(
        metered=True,
        endpoint=COMPLETIONS,
        model=model,
        max_output_tokens=max_tokens,
        choices=prompts * per_prompt,
        stream=data.get("stream") is True,
        input_token_bound=tokens,
        client_wants_stream_usage=bool(stream_options.get("include_usage")),
    )


def read_embeddings(data: dict, exact: bool) -> RequestFacts:
    model = required_model(data)
    count = text_bound(model, exact)
    _, tokens = prompt_tokens(count, data.get("input"), "input")
    return RequestFacts(metered=True, endpoint=EMBEDDINGS, model=model, max_output_tokens=0, input_token_bound=tokens)


READERS = {CHAT: read_chat, RESPONSES: read_responses, COMPLETIONS: read_completions, EMBEDDINGS: read_embeddings}


def prompt_tokens(count: TextBound, prompt, field: str) -> tuple[int, int]:
    """(how many prompts, a bound on their tokens) for a text, a list of texts, or token arrays."""
    if isinstance(prompt, str):
        return 1, count(prompt) + 1
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
        return 1, len(prompt)
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        return len(prompt), sum(count(p) + 1 for p in prompt)
    if isinstance(prompt, list) and prompt and all(isinstance(p, list) for p in prompt):
        return len(prompt), sum(len(p) for p in prompt)
    raise MalformedRequest(f"'{field}' must be a string, a list of strings, or token arrays")


def usage_from_object(usage) -> Usage | None:
    """Chat, completions and embeddings report `prompt_tokens`; the Responses API `input_tokens`.
    Counts that are not sane raise UsageRejected."""
    if not isinstance(usage, dict):
        return None
    if "prompt_tokens" in usage:
        names = ("prompt_tokens", "completion_tokens", "prompt_tokens_details", "completion_tokens_details")
    elif "input_tokens" in usage:
        names = ("input_tokens", "output_tokens", "input_tokens_details", "output_tokens_details")
    else:
        return None
    input_name, output_name, input_details, output_details = names
    return Usage(
        input_tokens=usage_count(usage, input_name),
        output_tokens=usage_count(usage, output_name),
        cached_tokens=usage_count(usage_object(usage, input_details), "cached_tokens"),
        reasoning_tokens=usage_count(usage_object(usage, output_details), "reasoning_tokens"),
    )


def chat_input_bound(count: TextBound, messages: list, data: dict) -> int:
    """An upper bound on the prompt tokens OpenAI will bill for these messages.

    Text is counted with the model's own tiktoken encoding; images get the most any image can cost;
    tool definitions and a structured-output schema become prompt text too.
    """
    tokens = REPLY_PRIMING_TOKENS
    for message in messages:
        if not isinstance(message, dict):
            raise MalformedRequest("each message must be an object")
        tokens += TOKENS_PER_MESSAGE
        for value in message.values():
            tokens += content_tokens(count, value)
    tokens += tools_tokens(count, data.get("tools") or data.get("functions"))
    return tokens + schema_tokens(count, data.get("response_format"))


def has_audio_input(messages: list) -> bool:
    return any(
        isinstance(part, dict) and part.get("type") == "input_audio"
        for message in messages
        if isinstance(message, dict) and isinstance(message.get("content"), list)
        for part in message["content"]
    )


def schema_tokens(count: TextBound, output_format) -> int:
    """A structured-output format: its schema becomes prompt text."""
    if not isinstance(output_format, dict) or output_format.get("type", "text") == "text":
        return 0
    return TOOLS_OVERHEAD_TOKENS + count(json.dumps(output_format))


def tools_tokens(count: TextBound, tools) -> int:
    if not tools:
        return 0
    if not isinstance(tools, list):
        raise MalformedRequest("'tools' must be a list")
    for tool in tools:
        kind = tool.get("type", "function") if isinstance(tool, dict) else None
        if kind not in CLIENT_TOOL_TYPES:
            raise Unmeterable(
                f"the hosted tool {kind!r} is billed per use, beyond tokens, so this proxy cannot meter it"
            )
    return TOOLS_OVERHEAD_TOKENS + count(json.dumps(tools))


def instructions_tokens(count: TextBound, data: dict) -> int:
    instructions = data.get("instructions")
    return TOKENS_PER_MESSAGE + count(instructions) if isinstance(instructions, str) else 0


def content_tokens(count: TextBound, value) -> int:
    if isinstance(value, str):
        return count(value)
    if isinstance(value, list):
        return sum(content_part_tokens(count, part) for part in value)
    if isinstance(value, dict):
        return count(json.dumps(value))
    return 0


def content_part_tokens(count: TextBound, part) -> int:
    if isinstance(part, dict) and part.get("type") in ("image_url", "input_image", "image"):
        return IMAGE_TOKEN_ALLOWANCE
    if isinstance(part, dict) and part.get("type") in ("file", "input_file"):
        raise MalformedRequest(
            "file parts (PDFs and other documents) cannot be bounded in tokens before the call,"
            " so they cannot be metered by this proxy yet"
        )
    if isinstance(part, dict) and isinstance(part.get("text"), str):
        return count(part["text"]) + 1
    return count(json.dumps(part))


def response_item_tokens(count: TextBound, item, unseen: set[str]) -> int:
    """A bound on one Responses API input item; what only the provider can see goes into `unseen`.

    A file is read by OpenAI (so is an item referenced by id): both are bounded by the context window.
    Reasoning carried over from an earlier turn is counted by the bytes of its (encrypted) text.
    """
    if not isinstance(item, dict):
        raise MalformedRequest("each input item must be an object")
    kind = item.get("type", "message")
    if kind == "item_reference":
        unseen.add("item_reference")
        return TOKENS_PER_MESSAGE
    if kind == "reasoning":
        return TOKENS_PER_MESSAGE + utf8_len(item)
    content = item.get("content")
    if kind == "message" and isinstance(content, list):
        rest = [part for part in content if not (isinstance(part, dict) and part.get("type") == "input_file")]
        if len(rest) < len(content):
            unseen.add("input_file")
        others = {k: v for k, v in item.items() if k != "content"}
        return TOKENS_PER_MESSAGE + content_tokens(count, rest) + count(json.dumps(others))
    return TOKENS_PER_MESSAGE + sum(content_tokens(count, value) for value in item.values())


class ChatStreamMeter:
    """Reads a chat (or legacy completions) stream: the usage chunk at the end, and `[DONE]`.

    Only a chunk with a `usage` other than null is parsed: the text chunks before it cost nothing to
    read (a stream's events pass at the rate of the output tokens). When the proxy asked for usage on
    the client's behalf, that extra chunk is not passed on.
    """

    def __init__(self, hide_usage_chunk: bool):
        self.hide_usage_chunk = hide_usage_chunk
        self.usage: Usage | None = None
        self.usage_rejected: str | None = None
        self.done = False

    def feed(self, event: SseEvent) -> bool:
        if CARRIES_USAGE.search(event.data) is None:
            self.done = self.done or event.data.strip() == "[DONE]"
            return True
        chunk = event_json(event)
        if chunk is None:
            return True
        try:
            usage = usage_from_object(chunk.get("usage"))
        except UsageRejected as e:
            self.usage_rejected = self.usage_rejected or str(e)
            return True
        if usage is None:
            return True
        self.usage = usage
        return not (self.hide_usage_chunk and not chunk.get("choices"))

    def result(self) -> StreamResult:
        return stream_result(self.usage, self.usage_rejected, self.done)


# A chat chunk whose `usage` is anything but null: the only kind the meter parses. (A key spelled with
# escapes would be missed, and the stream then charged its full hold: never less than it cost.)
CARRIES_USAGE = re.compile(r'"usage"\s*:(?!\s*null\b)')
# A Responses stream ends with one of these; each carries the whole response, usage included.
RESPONSE_END_EVENTS = ("response.completed", "response.incomplete", "response.failed")


class ResponsesStreamMeter:
    """Reads a Responses API stream: the usage from its final event.

    An event named (by its `event:` line) as anything but a final one is not parsed.
    """

    def __init__(self):
        self.usage: Usage | None = None
        self.usage_rejected: str | None = None

    def feed(self, event: SseEvent) -> bool:
        if event.event is not None and event.event not in RESPONSE_END_EVENTS:
            return True
        data = event_json(event)
        if data is None or data.get("type") not in RESPONSE_END_EVENTS:
            return True
        try:
            self.usage = usage_from_object((data.get("response") or {}).get("usage"))
        except UsageRejected as e:
            self.usage_rejected = self.usage_rejected or str(e)
        return True

    def result(self) -> StreamResult:
        return stream_result(self.usage, self.usage_rejected, True)


def stream_result(usage: Usage | None, rejected: str | None, ended: bool) -> StreamResult:
    """A stream's usage, believed only when no part of it was rejected; complete once it ended with usage."""
    if rejected:
        return StreamResult(usage=None, complete=False, usage_rejected=rejected)
    return StreamResult(usage=usage, complete=ended and usage is not None)


FORMAT = OpenAIFormat()


def stream_options_of(data: dict) -> dict:
    """`stream_options`, which the proxy may have to add `include_usage` to: an object, or absent."""
    options = data.get("stream_options")
    if options is None:
        return {}
    if not isinstance(options, dict):
        raise MalformedRequest("'stream_options' must be an object")
    return options
