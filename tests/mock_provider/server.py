"""The mock provider's core: an HTTP server that routes each request to its wire format, records it,
applies the behaviours a test asked for (fail, delay, cut a stream), and reports what it billed."""

from __future__ import annotations

import argparse
import dataclasses
import json
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from mock_provider import anthropic, azure, documents, gemini, objects, openai, replies
from mock_provider.call import Received
from mock_provider.tokens import count_o200k_tokens, o200k

# A request header asking for a stream paced like a real model's: seconds between events (the benchmark's).
EVENT_INTERVAL_HEADER = "x-mock-event-interval"

REPLIES = {
    openai.Chat: replies.chat,
    openai.Responses: replies.responses,
    anthropic.Messages: replies.anthropic,
    gemini.GenerateContent: replies.gemini,
}
_AUTHORIZED = {
    "openai": openai.authorized,
    "anthropic": anthropic.authorized,
    "gemini": gemini.authorized,
    "azure": azure.authorized,
    "openai_v1": azure.v1_authorized,
}


def _corrupted(document: Any, corruption: tuple[str, Any] | None) -> Any:
    """``document`` with every value of the field ``corruption`` names replaced by its value."""
    if corruption is None:
        return document
    field, value = corruption
    if isinstance(document, dict):
        return {k: value if k == field else _corrupted(v, corruption) for k, v in document.items()}
    if isinstance(document, list):
        return [_corrupted(item, corruption) for item in document]
    return document


def _corrupted_event(event: bytes, corruption: tuple[str, Any] | None) -> bytes:
    if corruption is None:
        return event
    lines = event.decode().split("\n")
    for i, line in enumerate(lines):
        if line.startswith("data: ") and line[6:].startswith("{"):
            lines[i] = "data: " + json.dumps(_corrupted(json.loads(line[6:]), corruption), separators=(",", ":"))
    return "\n".join(lines).encode()


@dataclass(frozen=True)
class _Route:
    """Who answers a metered call: the API, whose key it takes, the model its path names (if any)."""

    api: type
    auth: str
    model: str | None = None


def _route(path: str, query: str) -> _Route | None:
    if path in openai.APIS:
        return _Route(openai.APIS[path], "openai")
    if path == "/v1/messages":
        return _Route(anthropic.Messages, "anthropic")
    on_gemini = gemini.PATH.match(path)
    if on_gemini and on_gemini["action"] in ("generateContent", "streamGenerateContent"):
        return _Route(gemini.GenerateContent, "gemini", on_gemini["model"])
    deployment = azure.DEPLOYMENT.match(path)
    if deployment and "api-version=" in query:
        return _Route(openai.APIS["/v1" + deployment["endpoint"]], "azure", deployment["deployment"])
    if path.startswith("/openai/v1/") and path.removeprefix("/openai") in openai.APIS:
        return _Route(openai.APIS[path.removeprefix("/openai")], "openai_v1")
    return None


# ---------------------------------------------------------------------------
# HTTP server
# ---------------------------------------------------------------------------


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 1024  # the benchmark opens hundreds of connections at once

    def __init__(self, address: tuple[str, int], mock_provider: MockProvider):
        self.mock_provider = mock_provider
        self.connections: set[socket.socket] = set()  # open client connections, closed by stop()
        super().__init__(address, _Handler)

    def handle_error(self, request, client_address) -> None:
        # A client hanging up mid-response is routine (cancelled streams); stay quiet.
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive
    disable_nagle_algorithm = True  # headers and body go out as separate small writes
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        """Silence the per-request log line on stderr."""

    def setup(self) -> None:
        super().setup()
        self.server.connections.add(self.connection)

    def finish(self) -> None:
        self.server.connections.discard(self.connection)
        super().finish()

    def _dispatch(self) -> None:
        mock_provider = self.server.mock_provider
        body = self._read_body()
        path, _, query = self.path.partition("?")
        headers = {name.lower(): value for name, value in self.headers.items()}
        try:
            parsed = json.loads(body) if body else None
        except ValueError:
            parsed = None
        request = Received(self.command, path, query, headers, body, parsed)
        mock_provider._record(request)

        route = _route(path, query) if self.command == "POST" else None
        on_gemini = gemini.PATH.match(path)
        if route is not None:
            self._metered(route, request)
        elif (self.command, path) == ("GET", "/v1/models"):
            self._models(request)
        elif (self.command, path) == ("GET", "/v1/files"):  # an endpoint no proxy can meter
            self._list(request, [])
        elif (self.command, path) == ("POST", "/v1/messages/count_tokens"):
            self._count(
                request, "anthropic", lambda body, n: {"input_tokens": anthropic.Messages.input_tokens(body, n)}
            )
        elif self.command == "POST" and on_gemini and on_gemini["action"] == "countTokens":
            self._count(
                request, "gemini", lambda body, n: {"totalTokens": gemini.GenerateContent.input_tokens(body, n)}
            )
        elif answer := objects.answer(
            self.command, path, request.json, mock_provider.contexts, mock_provider.count_tokens
        ):
            self._object(request, *answer)
        else:
            self._send_json(404, openai.Chat.error(404, f"Invalid URL ({self.command} {path})"))

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _dispatch

    def _read_body(self) -> bytes:
        """The request body, whether sent with Content-Length or chunked."""
        if "chunked" not in self.headers.get("Transfer-Encoding", "").lower():
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))
        parts = []
        while size := int(self.rfile.readline().split(b";")[0], 16):
            parts.append(self.rfile.read(size))
            self.rfile.readline()  # CRLF after the chunk data
        while self.rfile.readline() not in (b"\r\n", b"\n", b""):
            pass  # trailers
        return b"".join(parts)

    def _models(self, request: Received) -> None:
        model = {"id": "gpt-4o-mini", "object": "model", "created": 1721172741, "owned_by": "system"}
        self._list(request, [model])

    def _list(self, request: Received, data: list) -> None:
        if not openai.authorized(request.headers, self.server.mock_provider):
            self._send_json(401, openai.Chat.error(401, "Incorrect API key provided."))
            return
        self._send_json(200, {"object": "list", "data": data})

    def _object(self, request: Received, status: int, payload: dict | None) -> None:
        """A free object endpoint's answer (traces, conversations), to OpenAI's key only."""
        if not openai.authorized(request.headers, self.server.mock_provider):
            self._send_json(401, openai.Chat.error(401, "Incorrect API key provided."))
        elif payload is None:
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()
        else:
            self._send_json(status, payload)

    def _count(self, request: Received, auth: str, answer: Callable[[dict, Callable[[str], int]], dict]) -> None:
        """A free token count (Anthropic's count_tokens, Gemini's countTokens): not billed, not reported."""
        api = anthropic.Messages if auth == "anthropic" else gemini.GenerateContent
        if not _AUTHORIZED[auth](request.headers, self.server.mock_provider):
            self._send_json(401, api.error(401, "Incorrect API key provided."))
        elif api.invalid({"model": "m", "max_tokens": 1, **(request.json or {})}):
            self._send_json(400, api.error(400, "invalid count request"))
        else:
            self._send_json(200, answer(request.json, self.server.mock_provider.count_tokens))

    def _metered(self, route: _Route, request: Received) -> None:
        mock_provider, api = self.server.mock_provider, route.api
        if not _AUTHORIZED[route.auth](request.headers, mock_provider):
            self._send_json(401, api.error(401, "Incorrect API key provided."))
            return
        body = request.json
        if route.model and isinstance(body, dict):  # Gemini and Azure deployments name the model in the path
            body = {**body, "model": route.model}
        if api is gemini.GenerateContent and isinstance(body, dict):  # and Gemini says in the path whether it streams
            body["stream"] = request.path.endswith(":streamGenerateContent")
        problem = api.invalid(body)
        if problem:
            self._send_json(400, api.error(400, problem))
            return
        if api is gemini.GenerateContent and body["stream"] and "alt=sse" not in request.query:
            self._send_json(400, api.error(400, "this mock streams Gemini only as server-sent events (?alt=sse)"))
            return
        call = api.call(body, mock_provider.count_tokens, mock_provider.output_tokens, mock_provider._prompt_cache)
        call = dataclasses.replace(call, input_tokens=call.input_tokens + documents.billed_tokens(body, api.name))
        if api in REPLIES and isinstance(body, dict):  # a tool call or schema-shaped JSON, when asked for
            reply, tool_call = REPLIES[api](body)
            call = dataclasses.replace(call, reply=reply, tool_call=tool_call)
        if api in (openai.Responses, openai.Compact):  # a continuation brings in what it continues
            call = dataclasses.replace(call, input_tokens=call.input_tokens + mock_provider.contexts.inherited(body))
        echo = mock_provider._take_echo()
        if echo is not None:
            self._send_json(echo, api.error(echo, f"bad request; you sent {request.headers}"), request.headers)
            return
        overrun = mock_provider._take_overrun()
        if overrun is not None:
            call = dataclasses.replace(call, output_tokens=overrun, truncated=False)

        delay, fail_status, cut_after = mock_provider._take_behaviours(call.stream)
        if delay:
            time.sleep(delay)
        if fail_status is not None:
            self._send_json(fail_status, api.error(fail_status, "Mock failure injected by fail_next()."))
            return

        usage = call.report(api.name)
        corruption = mock_provider._take_corruption()
        if not call.stream:
            mock_provider._report(usage)
            document = api.completion(call, body)
            self._remember(api, body, call, document)
            self._send_json(200, _corrupted(document, corruption))
            return

        head, content, tail = (
            [_corrupted_event(event, corruption) for event in part] for part in api.stream(call, body)
        )
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        if cut_after is not None:
            self._write_chunks(head + content[:cut_after])
            self._drop_connection()
            return
        stall = mock_provider._take_stall()
        if stall:
            self._write_chunks(head + content[:1])
            time.sleep(stall)
            head, content = [], content[1:]
        self._write_chunks(head + content, interval=float(self.headers.get(EVENT_INTERVAL_HEADER) or 0))
        mock_provider._report(usage)  # before the client can see the end of the stream
        self._remember(api, body, call, json.loads(tail[-1].decode().partition("data: ")[2])["response"]
                       if api is openai.Responses else None)  # fmt: skip
        self._write_chunks(tail, last=True)

    def _remember(self, api, body: dict, call, document: dict | None) -> None:
        """A Responses API answer: what a later call continuing it (or its conversation) brings in."""
        if api is openai.Responses and document:
            self.server.mock_provider.contexts.remember(document["id"], body, call.input_tokens, call.output_tokens)

    def _write_chunks(self, events: list[bytes], last: bool = False, interval: float = 0) -> None:
        """Send each event as its own HTTP chunk, ``interval`` seconds apart; ``last`` ends the body.

        ``wfile`` is unbuffered, so every write goes straight to the socket.
        """
        for i, event in enumerate(events):
            if interval and i:
                time.sleep(interval)
            data = b"%x\r\n%s\r\n" % (len(event), event)
            if last and i == len(events) - 1:
                data += b"0\r\n\r\n"
            self.wfile.write(data)

    def _drop_connection(self) -> None:
        """Close the TCP connection mid-body: no terminator, no zero chunk.

        A shutdown (FIN) rather than a reset, so the events already sent are
        reliably delivered before the client sees the truncated body.
        """
        self.close_connection = True
        self.connection.shutdown(socket.SHUT_RDWR)

    def _send_json(self, status: int, payload: Any, echoed: dict[str, str] | None = None) -> None:
        data = json.dumps(payload, separators=(",", ":")).encode()
        self.send_response(status)
        for name, value in (echoed or {}).items():
            self.send_header(f"x-echo-{name}", value)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


# ---------------------------------------------------------------------------
# The mock provider
# ---------------------------------------------------------------------------


class MockProvider:
    """An in-process mock of the OpenAI and Anthropic APIs.

    Usage::

        mock = MockProvider().start()
        client = openai.OpenAI(api_key=mock.openai_key, base_url=mock.url + "/v1")
        ...
        mock.stop()
    """

    def __init__(
        self,
        openai_key: str = "sk-test-real-openai",
        anthropic_key: str = "sk-ant-test-real-anthropic",
        output_tokens: int = 12,
        count_tokens: Callable[[str], int] | None = None,
        gemini_key: str = "test-real-gemini-key",
        azure_key: str = "test-real-azure-key",
        extra_openai_keys: tuple[str, ...] = (),
    ):
        self.openai_key = openai_key
        self.anthropic_key = anthropic_key
        self.gemini_key = gemini_key
        self.azure_key = azure_key
        self.extra_openai_keys = extra_openai_keys  # OpenAI-compatible hosts' keys, for the same endpoints
        self._prompt_cache: set[str] = set()  # prompt-cache entries, kept until reset()
        self.contexts = objects.Contexts()  # stored responses, conversations and traces, kept until reset()
        self.output_tokens = output_tokens
        if count_tokens is None:
            o200k()  # load now: fail fast, and keep it out of the first request's latency
            count_tokens = count_o200k_tokens
        self.count_tokens = count_tokens
        self.received: list[Received] = []
        self.reported: list[dict] = []
        self._lock = threading.Lock()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._clear_behaviours()

    # -- lifecycle ----------------------------------------------------------

    def start(self, port: int = 0) -> MockProvider:
        """Serve on 127.0.0.1 (a free port unless ``port`` is given) in a daemon thread."""
        self._server = _Server(("127.0.0.1", port), self)
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.1},
            name="mock-provider",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close every open client connection."""
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        for connection in list(self._server.connections):
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # already closed
        self._thread.join()
        self._server = self._thread = None

    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError("MockProvider is not started")
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    # -- test controls ------------------------------------------------------

    def reset(self) -> None:
        """Forget received requests, reported usage and pending behaviours."""
        with self._lock:
            self.received.clear()
            self.reported.clear()
            self._prompt_cache.clear()
            self.contexts.clear()
            self._clear_behaviours()

    def fail_next(self, status: int, count: int = 1) -> None:
        """Answer the next ``count`` metered calls with ``status`` and the provider's error body."""
        with self._lock:
            self._fail_status, self._fail_count = status, count

    def cut_next_stream(self, after_chunks: int) -> None:
        """Drop the next streaming call's connection after ``after_chunks`` content events."""
        with self._lock:
            self._cut_after = after_chunks

    def delay_next(self, seconds: float) -> None:
        """Sleep ``seconds`` before answering the next metered call."""
        with self._lock:
            self._delay = seconds

    def echo_next_error(self, status: int) -> None:
        """Answer the next metered call with ``status``, echoing its request headers in a response header
        and in the error body (as some upstreams' error pages do)."""
        with self._lock:
            self._echo_status = status

    def overrun_next(self, output_tokens: int) -> None:
        """Answer the next metered call with ``output_tokens``, whatever its max_tokens (a provider that
        does not keep to the limit)."""
        with self._lock:
            self._overrun_output = output_tokens

    def corrupt_next_usage(self, field: str, value: Any) -> None:
        """Make the next metered call report ``value`` wherever its answer (whole or streamed) has a usage
        ``field``; what it bills (``reported``) stays the real figure."""
        with self._lock:
            self._corruption = (field, value)

    def _take_corruption(self) -> tuple[str, Any] | None:
        with self._lock:
            corruption, self._corruption = self._corruption, None
            return corruption

    def stall_next_stream(self, seconds: float) -> None:
        """Pause the next stream for ``seconds`` after its first content event (a model still thinking)."""
        with self._lock:
            self._stall = seconds

    # -- used by the handler ------------------------------------------------

    def _clear_behaviours(self) -> None:
        self._fail_status = 0
        self._fail_count = 0
        self._cut_after: int | None = None
        self._delay = 0.0
        self._stall = 0.0
        self._overrun_output: int | None = None
        self._corruption: tuple[str, Any] | None = None
        self._echo_status: int | None = None

    def _take_echo(self) -> int | None:
        with self._lock:
            echo, self._echo_status = self._echo_status, None
            return echo

    def _take_overrun(self) -> int | None:
        with self._lock:
            overrun, self._overrun_output = self._overrun_output, None
            return overrun

    def _take_stall(self) -> float:
        with self._lock:
            stall, self._stall = self._stall, 0.0
            return stall

    def _take_behaviours(self, stream: bool) -> tuple[float, int | None, int | None]:
        """Consume the behaviours pending for a metered call: (delay, fail status, cut after).

        A cut is only consumed by a streaming call that is not failed.
        """
        with self._lock:
            delay, self._delay = self._delay, 0.0
            fail_status = None
            if self._fail_count > 0:
                fail_status = self._fail_status
                self._fail_count -= 1
            cut_after = None
            if stream and fail_status is None:
                cut_after, self._cut_after = self._cut_after, None
            return delay, fail_status, cut_after

    def _record(self, request: Received) -> None:
        with self._lock:
            self.received.append(request)

    def _report(self, usage: dict) -> None:
        with self._lock:
            self.reported.append(usage)


def main() -> None:
    parser = argparse.ArgumentParser(description="Serve the mock LLM provider until killed.")
    parser.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (default: a free one)")
    parser.add_argument("--output-tokens", type=int, default=12, help="reply length in tokens")
    args = parser.parse_args()
    mock_provider = MockProvider(output_tokens=args.output_tokens).start(args.port)
    print(f"listening on {mock_provider.url}", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        mock_provider.stop()
