"""Google Gemini (the Generative Language API): generateContent and streamGenerateContent, with
countTokens and the model list free.

The path names the model: `/v1beta/models/{model}:generateContent`. The key travels in
`x-goog-api-key` or as `?key=`; the proxy treats both as credentials, strips them, and sends the
real key in the header only. Streams are metered as server-sent events (`?alt=sse`, what every
Google SDK asks for); the JSON-array form would have to be buffered whole, so it is refused.

Gemini's tokenizer is not public: the input bound is the UTF-8 byte count, as for Anthropic.
Thinking tokens are billed as output and count against `maxOutputTokens`, so that limit bounds
both. The REST API accepts both lowerCamelCase and snake_case field names; both are read.
"""

import json
import re
from urllib.parse import parse_qs

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
    set_output_cap,
    usage_count,
    utf8_len,
)
from agentkeys.providers.documents import inline_document_tokens

GENERATE = re.compile(
    r"^/v1(?:beta|alpha)?/models/(?P<model>[^/:]+):(?P<action>generateContent|streamGenerateContent)$"
)
FREE = [("POST", "/v1*/models/*:countTokens"), ("GET", "/v1*/models"), ("GET", "/v1*/models/*")]

TOKENS_PER_CONTENT = 8
REQUEST_OVERHEAD_TOKENS = 16
# An image is cut into 768×768 tiles of 258 tokens after scaling to at most 3072×3072 (16 tiles);
# newer models' high media resolution is about 1,100 tokens. Allow generously.
IMAGE_TOKEN_ALLOWANCE = 20_000
TOOLS_OVERHEAD_TOKENS = 1_000
# Function declarations cost only tokens; Google's own tools (search grounding, code execution,
# URL context, maps) are billed per use or add input the request does not show.
CLIENT_TOOL_FIELDS = {"functionDeclarations"}

ERRORS = {
    DenyKind.UNAUTHENTICATED: (401, "UNAUTHENTICATED"),
    DenyKind.FORBIDDEN: (403, "PERMISSION_DENIED"),
    DenyKind.BUDGET: (429, "RESOURCE_EXHAUSTED"),
    DenyKind.RATE_LIMITED: (429, "RESOURCE_EXHAUSTED"),
    DenyKind.LOOP: (429, "RESOURCE_EXHAUSTED"),
    DenyKind.BAD_REQUEST: (400, "INVALID_ARGUMENT"),
    DenyKind.TOO_LARGE: (413, "INVALID_ARGUMENT"),
    DenyKind.UNAVAILABLE: (503, "UNAVAILABLE"),
    DenyKind.NOT_CONFIGURED: (500, "FAILED_PRECONDITION"),
    DenyKind.NOT_FOUND: (404, "NOT_FOUND"),
    DenyKind.INTERNAL: (500, "INTERNAL"),
}


class GeminiFormat:
    name = "gemini"

    def endpoint_kind(self, method: str, path: str) -> str | None:
        if method == "POST" and GENERATE.match(path):
            return "metered"
        return kind_of_endpoint(method, path, [], FREE)

    def request_facts(self, method: str, path: str, body: bytes, query: str = "", exact: bool = False) -> RequestFacts:
        """`exact` changes nothing here: this format's texts are bounded by their bytes."""
        match = GENERATE.match(path) if method == "POST" else None
        if match is None:
            return RequestFacts(metered=False)
        stream = match["action"] == "streamGenerateContent"
        if stream and parse_qs(query).get("alt") != ["sse"]:
            raise MalformedRequest(
                "streamGenerateContent is metered as server-sent events only: add ?alt=sse (the Google SDKs do)"
            )
        data = parse_json_object(body)
        config = field(data, "generationConfig") or {}
        if not isinstance(config, dict):
            raise MalformedRequest("'generationConfig' must be an object")
        unseen = set()
        return RequestFacts(
            metered=True,
            endpoint=match["action"],
            model=match["model"],
            max_output_tokens=optional_positive_int(config, "maxOutputTokens", "max_output_tokens"),
            choices=optional_positive_int(config, "candidateCount", "candidate_count") or 1,
            stream=stream,
            input_token_bound=input_bound(data, unseen),
            unseen_input=", ".join(sorted(unseen)) or None,
            may_write_cache=False,  # implicit caching only discounts reads; explicit caches are made elsewhere
        )

    def upstream_body(self, facts: RequestFacts, body: bytes, cap_output_tokens: int | None) -> bytes | None:
        """As sent, unless the hold assumed an output cap: then it goes into the generation config."""
        if cap_output_tokens is None:
            return None
        data = json.loads(body)
        snake = "generation_config" in data  # write in the client's own style
        config = data.setdefault("generation_config" if snake else "generationConfig", {})
        fields = ("maxOutputTokens", "max_output_tokens")
        set_output_cap(config, cap_output_tokens, fields[::-1] if snake else fields)
        return json.dumps(data).encode()

    def usage_from_response(self, body: bytes) -> Usage | None:
        try:
            metadata = json.loads(body).get("usageMetadata")
        except (ValueError, AttributeError):
            return None
        return usage_from_metadata(metadata)

    def stored_response(self, facts: RequestFacts, body: bytes) -> None:
        """This provider keeps no response for a later call to continue."""
        return None

    def stream_meter(self, facts: RequestFacts) -> "GenerateStreamMeter":
        return GenerateStreamMeter()

    def error(self, kind: DenyKind, message: str) -> tuple[int, dict]:
        status, name = ERRORS[kind]
        return status, {"error": {"code": status, "message": message, "status": name}}

    def real_key_header(self, key: str) -> tuple[str, str]:
        return "x-goog-api-key", key


def field(data: dict, camel: str):
    """A field by its lowerCamelCase name or its snake_case twin."""
    if camel in data:
        return data[camel]
    return data.get(re.sub(r"([A-Z])", lambda m: "_" + m[1].lower(), camel))


def usage_from_metadata(metadata) -> Usage | None:
    """Thinking tokens are billed as output; tool-use prompt tokens as input. Counts that are not sane
    raise UsageRejected."""
    if not isinstance(metadata, dict) or "promptTokenCount" not in metadata:
        return None
    thoughts = usage_count(metadata, "thoughtsTokenCount")
    return Usage(
        input_tokens=usage_count(metadata, "promptTokenCount") + usage_count(metadata, "toolUsePromptTokenCount"),
        output_tokens=usage_count(metadata, "candidatesTokenCount") + thoughts,
        cached_tokens=usage_count(metadata, "cachedContentTokenCount"),
        reasoning_tokens=thoughts,
    )


def input_bound(data: dict, unseen: set[str]) -> int:
    """A bound on the prompt tokens; input only Google can see (files, cached contexts) goes into `unseen`."""
    contents = field(data, "contents")
    if not isinstance(contents, list) or not contents:
        raise MalformedRequest("'contents' must be a non-empty list")
    tokens = REQUEST_OVERHEAD_TOKENS
    for content in [*contents, field(data, "systemInstruction") or {"parts": []}]:
        if not isinstance(content, dict):
            raise MalformedRequest("each content must be an object")
        parts = content.get("parts") or []
        if not isinstance(parts, list):
            raise MalformedRequest("'parts' must be a list")
        tokens += TOKENS_PER_CONTENT + sum(part_tokens(part, unseen) for part in parts)
    if field(data, "cachedContent"):
        unseen.add("cachedContent")
    return tokens + tools_tokens(field(data, "tools"))


def part_tokens(part, unseen: set[str]) -> int:
    if not isinstance(part, dict):
        raise MalformedRequest("each part must be an object")
    if isinstance(part.get("text"), str):
        return utf8_len(part["text"]) + 1
    inline = field(part, "inlineData")
    if isinstance(inline, dict) and str(field(inline, "mimeType") or "").startswith("image/"):
        return IMAGE_TOKEN_ALLOWANCE
    if isinstance(inline, dict) and isinstance(field(inline, "data"), str):
        document = inline_document_tokens(field(inline, "mimeType"), field(inline, "data"), IMAGE_TOKEN_ALLOWANCE)
        if document is not None:  # a PDF by its pages, a text file by its bytes (documents.py)
            return document
    if inline is not None or field(part, "fileData") is not None:
        unseen.add("media")  # audio, video and documents are counted by their length, which only Google reads
        return 0
    return utf8_len(part)


def tools_tokens(tools) -> int:
    if not tools:
        return 0
    if not isinstance(tools, list):
        raise MalformedRequest("'tools' must be a list")
    for tool in tools:
        names = {re.sub(r"_(\w)", lambda m: m[1].upper(), name) for name in tool} if isinstance(tool, dict) else {None}
        if not names <= CLIENT_TOOL_FIELDS:
            hosted = ", ".join(sorted(str(name) for name in names - CLIENT_TOOL_FIELDS))
            raise Unmeterable(
                f"Google's own tools ({hosted}) are billed per use or add unseen input, so this proxy cannot meter them"
            )
    return TOOLS_OVERHEAD_TOKENS + utf8_len(tools)


class GenerateStreamMeter:
    """Reads a streamGenerateContent SSE stream: usage from the final chunk.

    Every chunk may carry `usageMetadata`; only the one that arrives with a finish reason is final.
    A stream cut before that is charged its full hold. Once a chunk's usage is not sane, the
    stream's usage is not believed at all.
    """

    def __init__(self):
        self.usage: Usage | None = None
        self.usage_rejected: str | None = None
        self.finished = False

    def feed(self, event: SseEvent) -> bool:
        chunk = event_json(event)
        if chunk is None:
            return True
        for candidate in chunk.get("candidates") or []:
            self.finished = self.finished or bool(candidate.get("finishReason"))
        try:
            self.usage = usage_from_metadata(chunk.get("usageMetadata")) or self.usage
        except UsageRejected as e:
            self.usage_rejected = self.usage_rejected or str(e)
        return True

    def result(self) -> StreamResult:
        if self.usage_rejected:
            return StreamResult(usage=None, usage_rejected=self.usage_rejected)
        return StreamResult(usage=self.usage if self.finished else None)


FORMAT = GeminiFormat()
