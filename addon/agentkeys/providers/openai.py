"""OpenAI's wire format: chat completions, the Responses API, legacy completions and embeddings,
streaming and not, and the free reads (models, stored responses, input token counts).

Azure OpenAI sends the same bodies on other paths: `azure.py` maps its paths onto these endpoints.
"""

import dataclasses
import json
import re

from agentkeys.pricing import Usage
from agentkeys.providers.base import (
    DenyKind,
    MalformedRequest,
    RequestFacts,
    SseEvent,
    StoredResponse,
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
from agentkeys.providers.documents import data_url_tokens
from agentkeys.tokens import TextBound, text_bound

CHAT = "/v1/chat/completions"
RESPONSES = "/v1/responses"
COMPACT = "/v1/responses/compact"  # a conversation compacted by the model: a model call, with no output limit
COMPLETIONS = "/v1/completions"
EMBEDDINGS = "/v1/embeddings"
METERED = [("POST", CHAT), ("POST", RESPONSES), ("POST", COMPACT), ("POST", COMPLETIONS), ("POST", EMBEDDINGS)]
FREE = [
    ("GET", "/v1/models"),
    ("GET", "/v1/models/*"),
    ("GET", "/v1/responses/*"),  # a stored response
    ("GET", "/v1/responses/*/input_items"),
    ("DELETE", "/v1/responses/*"),
    ("POST", "/v1/responses/input_tokens"),
    # Side traffic SDKs send on their own: the Agents SDK's traces, and the Conversations API's objects
    # (a conversation's items are billed as input only when a response uses them, which is metered).
    ("POST", "/v1/traces/ingest"),
    ("POST", "/v1/conversations"),
    ("GET", "/v1/conversations/*"),
    ("POST", "/v1/conversations/*"),
    ("DELETE", "/v1/conversations/*"),
    ("GET", "/v1/conversations/*/items"),
    ("POST", "/v1/conversations/*/items"),
    ("GET", "/v1/conversations/*/items/*"),
    ("DELETE", "/v1/conversations/*/items/*"),
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
# An output item taken back as input (`previous_response_id`): its text is in the output count; its framing,
# id and call id are not.
OUTPUT_ITEM_INPUT_TOKENS = 64
# Tool definitions and structured-output schemas are rewritten by OpenAI into a system prompt of its own.
TOOLS_OVERHEAD_TOKENS = 1_000
# Tools the client runs itself: they cost only tokens (their definitions, calls and results). `shell` is
# the client's only with a local environment; a `namespace` groups other tools and is judged by them.
CLIENT_TOOL_TYPES = {"function", "custom", "computer", "computer_use_preview", "local_shell", "apply_patch"}
# Tools OpenAI runs and bills per use (searches, containers, generated images) or that bring in input of
# their own (MCP servers' listings): refused by name. A type in neither list is refused as unknown.
HOSTED_TOOL_TYPES = {
    "web_search", "web_search_preview", "web_search_2025_08_26", "web_search_preview_2025_03_11", "file_search",
    "code_interpreter", "image_generation", "mcp", "tool_search",
}  # fmt: skip
LOCAL_SHELL_ENVIRONMENTS = {None, "local"}
# Service tiers billed at the standard prices or less; `priority` costs more than the price table says.
STANDARD_SERVICE_TIERS = {None, "auto", "default", "flex"}

ERRORS = {
    DenyKind.UNAUTHENTICATED: (401, "invalid_request_error", "invalid_api_key"),
    DenyKind.FORBIDDEN: (403, "permission_error", "forbidden"),
    DenyKind.BUDGET: (429, "insufficient_quota", "insufficient_quota"),
    DenyKind.RATE_LIMITED: (429, "requests", "rate_limit_exceeded"),
    DenyKind.LOOP: (429, "requests", "loop_detected"),
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
            return RequestFacts(metered=False, adds_to_conversation=conversation_added_to(method, path))
        return read_endpoint(path, parse_json_object(body), exact)

    def stored_response(self, facts: RequestFacts, body: bytes) -> StoredResponse | None:
        if facts.endpoint != RESPONSES:
            return None
        try:
            return stored_response_of(json.loads(body))
        except ValueError:
            return None

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
    unseen: set[str] = set()
    return RequestFacts(
        metered=True,
        endpoint=CHAT,
        model=model,
        max_output_tokens=optional_positive_int(data, "max_completion_tokens", "max_tokens"),
        choices=optional_positive_int(data, "n") or 1,
        stream=data.get("stream") is True,
        input_token_bound=chat_input_bound(count, messages, data, unseen),
        unseen_input=", ".join(sorted(unseen)) or None,
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
    if data.get("prompt"):
        unseen.add("prompt")  # a stored prompt template: only OpenAI sees its text
    conversation = conversation_id(data.get("conversation"))
    continues = continuation(data.get("previous_response_id"), conversation)
    if given is None and not unseen and not continues:
        raise MalformedRequest("the request has no 'input'")
    return RequestFacts(
        metered=True,
        endpoint=RESPONSES,
        model=model,
        max_output_tokens=optional_positive_int(data, "max_output_tokens"),
        stream=data.get("stream") is True,
        input_token_bound=tokens,
        unseen_input=", ".join(sorted(unseen)) or None,
        continues=continues,
        conversation=conversation,
    )


def conversation_id(given) -> str | None:
    """The Responses API's `conversation`: its id, or an object with one."""
    if given is None:
        return None
    found = given.get("id") if isinstance(given, dict) else given
    if not isinstance(found, str) or not found:
        raise MalformedRequest("'conversation' must be a conversation id or an object with its 'id'")
    return found


def continuation(previous_response_id, conversation: str | None) -> tuple[str, str] | None:
    """What the call continues, as (field, id): an earlier response, or a conversation."""
    if previous_response_id is not None:
        if not isinstance(previous_response_id, str) or not previous_response_id:
            raise MalformedRequest("'previous_response_id' must be a response id")
        return ("previous_response_id", previous_response_id)
    return ("conversation", conversation) if conversation else None


def conversation_added_to(method: str, path: str) -> str | None:
    """The conversation a free call adds items to (`POST /v1/conversations/{id}/items`), which no call has
    measured yet."""
    parts = path.split("/")
    if method == "POST" and len(parts) == 5 and parts[1:3] == ["v1", "conversations"] and parts[4] == "items":
        return parts[3]
    return None


def stored_response_of(response) -> StoredResponse | None:
    """A Responses API response the provider keeps: each output item taken back as input adds its framing."""
    if not isinstance(response, dict) or not isinstance(response.get("id"), str):
        return None
    output = response.get("output")
    items = len(output) if isinstance(output, list) else 0
    return StoredResponse(response["id"], items * OUTPUT_ITEM_INPUT_TOKENS)


def read_compact(data: dict, exact: bool) -> RequestFacts:
    """A compaction reads what a response would (input, instructions, a previous response) and writes one
    item of the model's own length: it takes no output limit, so the model's own limit bounds it."""
    facts = read_responses(data, exact)
    return dataclasses.replace(facts, endpoint=COMPACT, max_output_tokens=None, stream=False, takes_output_limit=False)


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


READERS = {
    CHAT: read_chat,
    RESPONSES: read_responses,
    COMPACT: read_compact,
    COMPLETIONS: read_completions,
    EMBEDDINGS: read_embeddings,
}


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


def chat_input_bound(count: TextBound, messages: list, data: dict, unseen: set[str]) -> int:
    """An upper bound on the prompt tokens OpenAI will bill for these messages.

    Text is counted with the model's own tiktoken encoding; images get the most any image can cost;
    documents are bounded as documents.py says; tool definitions and a structured-output schema become
    prompt text too. What only OpenAI can see (a file by id) goes into `unseen`.
    """
    tokens = REPLY_PRIMING_TOKENS
    for message in messages:
        if not isinstance(message, dict):
            raise MalformedRequest("each message must be an object")
        tokens += TOKENS_PER_MESSAGE
        for value in message.values():
            tokens += content_tokens(count, value, unseen)
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
        check_client_tool(tool)
    return TOOLS_OVERHEAD_TOKENS + count(json.dumps(tools))


def check_client_tool(tool) -> None:
    """Unmeterable unless the client runs the tool itself (so it costs only tokens); see CLIENT_TOOL_TYPES."""
    if not isinstance(tool, dict):
        raise MalformedRequest("each tool must be an object")
    kind = tool.get("type", "function")
    if kind == "namespace":
        members = tool.get("tools")
        if not isinstance(members, list):
            raise MalformedRequest("a 'namespace' tool must list its 'tools'")
        for member in members:
            check_client_tool(member)
    elif kind == "shell":
        environment = shell_environment(tool)
        if environment not in LOCAL_SHELL_ENVIRONMENTS:
            raise Unmeterable(
                f"the hosted tool 'shell' with a {environment!r} environment runs in a container billed per use,"
                " so this proxy cannot meter it (a shell with a local environment is allowed)"
            )
    elif kind in HOSTED_TOOL_TYPES or (isinstance(kind, str) and kind.startswith("web_search")):
        raise Unmeterable(f"the hosted tool {kind!r} is billed per use, beyond tokens, so this proxy cannot meter it")
    elif kind not in CLIENT_TOOL_TYPES:
        raise Unmeterable(
            f"the tool type {kind!r} is not one this proxy knows to cost only tokens, so it cannot meter it"
        )


def shell_environment(tool: dict) -> str | None:
    """Where a `shell` tool runs: None (not said: the client) or its environment's type."""
    environment = tool.get("environment")
    if environment is None:
        return None
    if not isinstance(environment, dict):
        raise MalformedRequest("a 'shell' tool's 'environment' must be an object")
    return environment.get("type")


def instructions_tokens(count: TextBound, data: dict) -> int:
    instructions = data.get("instructions")
    return TOKENS_PER_MESSAGE + count(instructions) if isinstance(instructions, str) else 0


def content_tokens(count: TextBound, value, unseen: set[str]) -> int:
    if isinstance(value, str):
        return count(value)
    if isinstance(value, list):
        return sum(content_part_tokens(count, part, unseen) for part in value)
    if isinstance(value, dict):
        return count(json.dumps(value))
    return 0


def content_part_tokens(count: TextBound, part, unseen: set[str]) -> int:
    if isinstance(part, dict) and part.get("type") in ("image_url", "input_image", "image"):
        return IMAGE_TOKEN_ALLOWANCE
    if isinstance(part, dict) and part.get("type") in ("file", "input_file"):
        return file_part_tokens(count, part, unseen)
    if isinstance(part, dict) and isinstance(part.get("text"), str):
        return count(part["text"]) + 1
    return count(json.dumps(part))


def file_part_tokens(count: TextBound, part: dict, unseen: set[str]) -> int:
    """A chat `file` part (`{"file": {"file_data": …}}`) or a Responses `input_file`: an inline document
    as documents.py bounds it (plus its other fields, such as its name); one by id or URL is unseen."""
    fields = part.get("file") if part.get("type") == "file" else part
    if not isinstance(fields, dict):
        raise MalformedRequest(f"a {part.get('type')!r} part must be an object")
    data = fields.get("file_data")
    tokens = data_url_tokens(data, IMAGE_TOKEN_ALLOWANCE) if isinstance(data, str) else None
    if tokens is None:
        unseen.add(part["type"])
        tokens = 0
    return TOKENS_PER_MESSAGE + tokens + count(json.dumps({k: v for k, v in fields.items() if k != "file_data"}))


def response_item_tokens(count: TextBound, item, unseen: set[str]) -> int:
    """A bound on one Responses API input item; what only the provider can see goes into `unseen`.

    A file is bounded as documents.py says; an item referenced by id is bounded by the context window.
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
        others = {k: v for k, v in item.items() if k != "content"}
        return TOKENS_PER_MESSAGE + content_tokens(count, content, unseen) + count(json.dumps(others))
    return TOKENS_PER_MESSAGE + sum(content_tokens(count, value, unseen) for value in item.values())


class ChatStreamMeter:
    """Reads a chat (or legacy completions) stream for the usage chunk at its end.

    Only a chunk with a `usage` other than null is parsed: the text chunks before it cost nothing to
    read (a stream's events pass at the rate of the output tokens). When the proxy asked for usage on
    the client's behalf, that extra chunk is not passed on.
    """

    def __init__(self, hide_usage_chunk: bool):
        self.hide_usage_chunk = hide_usage_chunk
        self.usage: Usage | None = None
        self.usage_rejected: str | None = None

    def feed(self, event: SseEvent) -> bool:
        if CARRIES_USAGE.search(event.data) is None:
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
        return stream_result(self.usage, self.usage_rejected)


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
        self.stored: StoredResponse | None = None

    def feed(self, event: SseEvent) -> bool:
        if event.event is not None and event.event not in RESPONSE_END_EVENTS:
            return True
        data = event_json(event)
        if data is None or data.get("type") not in RESPONSE_END_EVENTS:
            return True
        self.stored = stored_response_of(data.get("response"))
        try:
            self.usage = usage_from_object((data.get("response") or {}).get("usage"))
        except UsageRejected as e:
            self.usage_rejected = self.usage_rejected or str(e)
        return True

    def result(self) -> StreamResult:
        return dataclasses.replace(stream_result(self.usage, self.usage_rejected), stored=self.stored)


def stream_result(usage: Usage | None, rejected: str | None) -> StreamResult:
    """A stream's usage, believed only when no part of it was rejected."""
    if rejected:
        return StreamResult(usage=None, usage_rejected=rejected)
    return StreamResult(usage=usage)


FORMAT = OpenAIFormat()


def stream_options_of(data: dict) -> dict:
    """`stream_options`, which the proxy may have to add `include_usage` to: an object, or absent."""
    options = data.get("stream_options")
    if options is None:
        return {}
    if not isinstance(options, dict):
        raise MalformedRequest("'stream_options' must be an object")
    return options
