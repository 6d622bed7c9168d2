"""What every wire format module provides, and the pieces they share.

A wire format (openai, anthropic, …) knows its provider's HTTP surface: which endpoints cost
money, what a request asks for (model, max output tokens, streaming), an upper bound on its input
tokens, where usage appears in a response or a stream, what the provider's errors look like, and
where the real key goes. It knows nothing of budgets or keys.
"""

import json
from dataclasses import dataclass, field
from enum import Enum
from typing import Protocol

from agentkeys.paths import path_matches
from agentkeys.pricing import Usage

# No model outputs (or is asked for) more tokens than this in one call; a larger limit is a mistake or
# an attack on the arithmetic (a 30-digit max_tokens would overflow the store's 64-bit integers).
MAX_TOKENS_LIMIT = 10**9
# Above this, a token count a provider reports is not a count but a fault (or a hostile upstream).
MAX_USAGE_TOKENS = 10**12
# Objects and lists nested deeper than this are no request of any API this proxy speaks.
MAX_JSON_DEPTH = 200
# Integers beyond 64 bits have no meaning in any provider's API (a `seed` is 64-bit at most).
MAX_JSON_INT_DIGITS = 20


class MalformedRequest(Exception):
    """The body of a metered call cannot be read; the call is refused with a 400."""


class UsageRejected(Exception):
    """A response or stream reported usage that is not a sane count (negative, fractional, absurd, not a
    number). It is outside data: the call is charged as if it had reported none (its full hold), and the
    message, which names the field and the value, is what the audit record gives as the reason."""


class Unmeterable(Exception):
    """A well-formed request the proxy cannot bound or meter (a hosted tool billed per use, a
    response finished in the background); the call is refused with a 403 saying what and why."""


class DenyKind(Enum):
    """Why the proxy answers instead of the provider; each format maps it to its own status and shape."""

    UNAUTHENTICATED = "unauthenticated"
    FORBIDDEN = "forbidden"
    BUDGET = "budget"
    RATE_LIMITED = "rate_limited"  # a rate limit: the same call passes after its retry-after
    LOOP = "loop"  # the loop breaker: the same call will not pass again
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
    takes_output_limit: bool = True  # False: the endpoint has no output limit to send, so the model's own bounds it
    # A stored response or conversation the call continues, as (the field naming it, its id): what it brings
    # in is bounded by what the proxy measured of it (gate.bound_continuation), else by the context window.
    continues: tuple[str, str] | None = None
    conversation: str | None = None  # the conversation this call's input and output are added to
    adds_to_conversation: str | None = None  # a free call adding items to this conversation, unmeasured

    def __post_init__(self):
        if self.choices * (self.max_output_tokens or 1) > MAX_TOKENS_LIMIT:
            raise MalformedRequest(f"the request asks for more than {MAX_TOKENS_LIMIT:,} output tokens in all")


@dataclass(frozen=True)
class StoredResponse:
    """A response the provider keeps, which a later call may continue (`previous_response_id`): its id, and
    the tokens its output items take as input beyond their output count (each item's framing and ids)."""

    response_id: str
    item_overhead_tokens: int


@dataclass
class StreamResult:
    usage: Usage | None  # the provider's own figures, when the stream reported them in full
    usage_rejected: str | None = None  # why the stream's usage was not believed (see UsageRejected)
    stored: StoredResponse | None = None  # the response the provider keeps, named by the stream's last event


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

    def request_facts(self, method: str, path: str, body: bytes, query: str = "", exact: bool = False) -> RequestFacts:
        """What the call asks for, read from its parsed body (never from its bytes). `exact`: count every
        text with the model's own tokenizer, however long (see tokens.token_bound)."""
        ...

    def upstream_body(self, facts: RequestFacts, body: bytes, cap_output_tokens: int | None) -> bytes | None: ...
    def usage_from_response(self, body: bytes) -> Usage | None:
        """The usage a whole response reports; None if it reports none; UsageRejected if it is not sane."""
        ...

    def stored_response(self, facts: RequestFacts, body: bytes) -> StoredResponse | None:
        """The response a whole answer says the provider keeps for a later call to continue, if any."""
        ...

    def stream_meter(self, facts: RequestFacts) -> StreamMeter: ...
    def error(self, kind: DenyKind, message: str) -> tuple[int, dict]: ...
    def real_key_header(self, key: str) -> tuple[str, str]:
        """The header (name, value) that carries the real key to the provider."""
        ...


Endpoints = list[tuple[str, str]]  # (METHOD, path glob)


def kind_of_endpoint(method: str, path: str, metered: Endpoints, free: Endpoints) -> str | None:
    """`metered`, `free`, or None, from a format's two endpoint lists (metered ones win)."""
    for kind, endpoints in (("metered", metered), ("free", free)):
        if any(m == method and path_matches(p, path) for m, p in endpoints):
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
    """The body of a metered call, parsed once: everything that decides its hold reads this, never the bytes.

    Refused, as bodies a provider could read otherwise than the proxy: a key twice in one object (JSON
    leaves it to the reader which one counts, and the body is forwarded as sent), `NaN` or `Infinity`
    (not JSON), integers beyond 64 bits, and nesting deeper than MAX_JSON_DEPTH.
    """
    try:
        data = json.loads(
            body or b"null", object_pairs_hook=object_without_duplicates, parse_constant=refuse_constant,
            parse_int=bounded_int,
        )  # fmt: skip
    except RecursionError:
        raise MalformedRequest(f"the request body is nested deeper than {MAX_JSON_DEPTH} levels") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise MalformedRequest(f"the request body is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise MalformedRequest("the request body must be a JSON object")
    if nesting_depth(data) > MAX_JSON_DEPTH:
        raise MalformedRequest(f"the request body is nested deeper than {MAX_JSON_DEPTH} levels")
    return data


def object_without_duplicates(pairs: list[tuple[str, object]]) -> dict:
    data = dict(pairs)
    if len(data) < len(pairs):
        seen = set()
        repeated = next(key for key, _ in pairs if key in seen or seen.add(key))
        raise MalformedRequest(f"the key {repeated!r} appears twice in one object of the request body")
    return data


def refuse_constant(name: str):
    raise MalformedRequest(f"the request body is not valid JSON ({name} is not a JSON number)")


def bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_JSON_INT_DIGITS:
        raise MalformedRequest(f"the request body has an integer of {len(text)} digits; no API field takes one")
    return int(text)


def nesting_depth(value) -> int:
    """How deeply objects and lists nest in `value`, worked out without recursion."""
    deepest, pending = 0, [(value, 1)]
    while pending:
        value, depth = pending.pop()
        children = value.values() if isinstance(value, dict) else value if isinstance(value, list) else None
        if children is None:
            continue
        deepest = max(deepest, depth)
        if depth <= MAX_JSON_DEPTH:
            pending.extend((child, depth + 1) for child in children)
    return deepest


def optional_positive_int(data: dict, *names: str) -> int | None:
    """The first of `names` present in `data`, checked to be a positive integer no larger than MAX_TOKENS_LIMIT
    (these are output limits and counts that multiply them)."""
    for name in names:
        value = data.get(name)
        if value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise MalformedRequest(f"'{name}' must be a positive integer")
        if value > MAX_TOKENS_LIMIT:
            raise MalformedRequest(f"'{name}' must be at most {MAX_TOKENS_LIMIT:,}")
        return value
    return None


def usage_count(container: dict, name: str) -> int:
    """A token count from a provider's usage: 0 when absent or null; UsageRejected unless a whole number from
    0 to MAX_USAGE_TOKENS (a negative count would refund the budget, a float or a huge one corrupt it)."""
    value = container.get(name)
    if value is None:
        return 0
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_USAGE_TOKENS:
        raise UsageRejected(f"the provider reported {name}={value!r}, which is not a token count")
    return value


def usage_object(container: dict, name: str) -> dict:
    """A nested part of a provider's usage (`prompt_tokens_details`, …): {} when absent; else it must be an object."""
    value = container.get(name)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise UsageRejected(f"the provider reported {name}={value!r}, which is not an object")
    return value


def has_key(value, name: str) -> bool:
    """Whether an object anywhere in a parsed body has the key `name` (walked without recursion)."""
    pending = [value]
    while pending:
        value = pending.pop()
        if isinstance(value, dict):
            if name in value:
                return True
            pending.extend(value.values())
        elif isinstance(value, list):
            pending.extend(value)
    return False


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
        if not self.pending and chunk.endswith((b"\n\n", b"\r\n\r\n")) and len(chunk) <= self.max_event_bytes:
            # The usual chunk, one whole event or several, with nothing held back: cut it where it lies.
            return [parse_event(raw) for raw in split_events(chunk)]
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


def boundary_end(data: bytes | bytearray, start: int) -> int | None:
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


def split_events(chunk: bytes) -> list[bytes]:
    """A chunk that ends on an event boundary, cut into its events (each with its boundary)."""
    events, start = [], 0
    while end := boundary_end(chunk, start):
        events.append(chunk[start:end])
        start = end
    return events


def parse_event(raw: bytes) -> SseEvent:
    line = raw.rstrip(b"\r\n")
    if raw.startswith(b"data: ") and b"\n" not in line and b"\r" not in line:
        # One `data:` line, the event of most streams: read without cutting it into lines.
        return SseEvent(raw=raw, event=None, data=line[6:].decode("utf-8", errors="replace"))
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
