"""What every wire format module provides, and the pieces they share.

A wire format (openai, anthropic, …) knows its provider's HTTP surface: which endpoints cost
money, what a request asks for (model, max output tokens, streaming), an upper bound on its input
tokens, where usage appears in a response or a stream, what the provider's errors look like, and
where the real key goes. It knows nothing of budgets or keys.
"""

import fnmatch
import json
from dataclasses import dataclass, field
from enum import Enum
from typing import Protocol

from agentkeys.pricing import Usage


class MalformedRequest(Exception):
    """The body of a metered call cannot be read; the call is refused with a 400."""


class Unmeterable(Exception):
    """A well-formed request the proxy cannot bound or meter (a hosted tool billed per use, a
    response finished in the background); the call is refused with a 403 saying what and why."""


class DenyKind(Enum):
    """Why the proxy answers instead of the provider; each format maps it to its own status and shape."""

    UNAUTHENTICATED = "unauthenticated"
    FORBIDDEN = "forbidden"
    BUDGET = "budget"
    BAD_REQUEST = "bad_request"
    TOO_LARGE = "too_large"
    UNAVAILABLE = "unavailable"
    NOT_CONFIGURED = "not_configured"  # the operator's mistake (no real key set): retrying cannot help
    NOT_FOUND = "not_found"
    INTERNAL = "internal"


@dataclass(frozen=True)
class RequestFacts:
    """What the gate needs to know about one request before forwarding it."""

    metered: bool
    endpoint: str | None = None  # which of the format's endpoints: picks its stream meter and output cap
    model: str | None = None
    max_output_tokens: int | None = None  # per choice; None: the request sets no limit; 0: it has no output
    choices: int = 1  # OpenAI's `n`: the provider bills every choice's output
    stream: bool = False
    input_token_bound: int = 0
    # Input the provider holds and the proxy cannot see (a previous response, a cached context, a
    # file): named here, and bounded by the model's context window instead of `input_token_bound`.
    unseen_input: str | None = None
    may_write_cache: bool = True  # whether the provider may bill prompt-cache writes for this call
    client_wants_stream_usage: bool = True


@dataclass
class StreamResult:
    usage: Usage | None  # the provider's own figures, when the stream got that far
    complete: bool
    streamed_text: str
    input_tokens_seen: int | None = None  # some formats report input at the start of a stream


class StreamMeter(Protocol):
    def feed(self, event: "SseEvent") -> bool:
        """Read one event; return whether to pass it on to the client."""
        ...

    def result(self) -> StreamResult: ...


class WireFormat(Protocol):
    name: str

    def endpoint_kind(self, method: str, path: str) -> str | None:
        """`metered`, `free`, or None for an endpoint the proxy cannot meter."""
        ...

    def request_facts(self, method: str, path: str, body: bytes, query: str = "") -> RequestFacts: ...
    def upstream_body(self, facts: RequestFacts, body: bytes, cap_output_tokens: int | None) -> bytes | None: ...
    def usage_from_response(self, body: bytes) -> Usage | None: ...
    def stream_meter(self, facts: RequestFacts) -> StreamMeter: ...
    def error(self, kind: DenyKind, message: str) -> tuple[int, dict]: ...
    def real_key_header(self, key: str) -> tuple[str, str]:
        """The header (name, value) that carries the real key to the provider."""
        ...


Endpoints = list[tuple[str, str]]  # (METHOD, path glob)


def kind_of_endpoint(method: str, path: str, metered: Endpoints, free: Endpoints) -> str | None:
    """`metered`, `free`, or None, from a format's two endpoint lists (metered ones win)."""
    for kind, endpoints in (("metered", metered), ("free", free)):
        if any(m == method and fnmatch.fnmatchcase(path, p) for m, p in endpoints):
            return kind
    return None


def set_output_cap(container: dict, cap: int, fields: tuple[str, ...]) -> None:
    """Write `cap` into every output-limit field the client used, else into the first of `fields`.

    Overwriting each one the client set (rather than adding a second) keeps a request valid on
    APIs that refuse two limits at once.
    """
    used = [name for name in fields if container.get(name) is not None]
    for name in used or fields[:1]:
        container[name] = cap


def parse_json_object(body: bytes) -> dict:
    try:
        data = json.loads(body or b"null")
    except (ValueError, UnicodeDecodeError) as e:
        raise MalformedRequest(f"the request body is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise MalformedRequest("the request body must be a JSON object")
    return data


def optional_positive_int(data: dict, *names: str) -> int | None:
    """The first of `names` present in `data`, checked to be a positive integer."""
    for name in names:
        value = data.get(name)
        if value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise MalformedRequest(f"'{name}' must be a positive integer")
        return value
    return None


def required_model(data: dict) -> str:
    model = data.get("model")
    if not isinstance(model, str) or not model:
        raise MalformedRequest("the request names no 'model'")
    return model


def utf8_len(value) -> int:
    """Bytes of a JSON value as text: an upper bound on its tokens for any byte-level BPE."""
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    return len(text.encode())


BOUNDARY_MAX_BYTES = 4  # \r\n\r\n
DEFAULT_MAX_EVENT_BYTES = 16 * 1024 * 1024


@dataclass
class SseEvent:
    raw: bytes
    event: str | None
    data: str


class SseEventTooLarge(Exception):
    """One event grew past the splitter's limit: metering gives up on the stream.

    `held` is every byte the splitter had not handed on; the relay passes it, and the rest of the
    stream, through untouched, and the call is charged its full hold.
    """

    def __init__(self, held: bytes, limit: int):
        super().__init__(f"a server-sent event exceeded {limit:,} bytes (max_stream_event_bytes)")
        self.held = held


@dataclass
class SseSplitter:
    """Cuts a byte stream into complete server-sent events as they arrive.

    Only an incomplete trailing event is held back: every complete event is handed on at once,
    so the proxy adds no latency a client could notice. Each byte is searched once (a boundary may
    straddle two chunks, so the last few bytes of a chunk are searched again), and an event larger
    than `max_event_bytes` raises SseEventTooLarge rather than growing without end.
    """

    max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES
    pending: bytearray = field(default_factory=bytearray)
    searched: int = 0  # bytes of `pending` known to hold no boundary

    def feed(self, chunk: bytes) -> list[SseEvent]:
        self.pending += chunk
        events, start = [], 0
        while end := boundary_end(self.pending, max(start, self.searched - BOUNDARY_MAX_BYTES + 1)):
            if end - start > self.max_event_bytes:
                break
            events.append(parse_event(bytes(self.pending[start:end])))
            start = end
        if len(self.pending) - start > self.max_event_bytes:
            held = bytes(self.pending)
            self.pending, self.searched = bytearray(), 0
            raise SseEventTooLarge(held, self.max_event_bytes)
        del self.pending[:start]
        self.searched = len(self.pending)
        return events

    def flush(self) -> bytes:
        rest, self.pending, self.searched = bytes(self.pending), bytearray(), 0
        return rest


def boundary_end(data: bytearray, start: int) -> int | None:
    """Where the first event boundary (a blank line: `\n\n`, `\r\n\r\n`, …) at or after `start` ends.

    A boundary is a newline, an optional carriage return, and a newline; found with `find`, which
    reads only from `start` on (a regular expression search pays for the whole buffer on each call).
    """
    newline = data.find(b"\n", start)
    while newline != -1:
        after = newline + 1
        if data[after : after + 1] == b"\n":
            return after + 1
        if data[after : after + 2] == b"\r\n":
            return after + 2
        newline = data.find(b"\n", after)
    return None


def parse_event(raw: bytes) -> SseEvent:
    name, data_lines = None, []
    for line in raw.decode("utf-8", errors="replace").splitlines():
        field_name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if field_name == "event":
            name = value
        elif field_name == "data":
            data_lines.append(value)
    return SseEvent(raw=raw, event=name, data="\n".join(data_lines))


def event_json(event: SseEvent) -> dict | None:
    try:
        data = json.loads(event.data)
    except ValueError:
        return None
    return data if isinstance(data, dict) else None
