"""A mock LLM provider speaking the OpenAI and Anthropic wire formats.

Used by the end-to-end tests and the benchmark as the "real" upstream behind
the proxy. It serves, on ``127.0.0.1``:

* ``POST /v1/chat/completions`` (OpenAI; streaming and non-streaming),
* ``POST /v1/messages`` (Anthropic; streaming and non-streaming),
* ``GET /v1/models`` (OpenAI model list; not metered),

answers anything else with a 404 in OpenAI's error shape, and records every
request in ``received`` and the usage it reported for every successful
metered call in ``reported``. Tests can make the next calls fail
(``fail_next``), be slow (``delay_next``) or lose their connection mid-stream
(``cut_next_stream``).

The reply to a metered call is ``n`` times "hello" ("hello hello hello"),
where ``n`` is the configured ``output_tokens`` capped by the request's
``max_tokens``; each word is exactly one o200k token. Input tokens are
counted with tiktoken's o200k encoding, loaded from a local file (nothing is
downloaded), unless another counter is injected.

Run ``python tests/mock_provider.py --port N`` to serve from another process.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar
from unittest.mock import patch

import tiktoken
from tiktoken.load import load_tiktoken_bpe
from tiktoken_ext import openai_public

# ---------------------------------------------------------------------------
# Token counting
# ---------------------------------------------------------------------------

_O200K_FILE = "o200k_base.tiktoken"


def _tiktoken_dirs() -> list[Path]:
    """Directories searched for ``o200k_base.tiktoken``, in order."""
    dirs = []
    if os.environ.get("AGENTKEYS_TIKTOKEN_DIR"):
        dirs.append(Path(os.environ["AGENTKEYS_TIKTOKEN_DIR"]))
    repo = Path(__file__).resolve().parent.parent
    dirs.append(repo / "addon" / "agentkeys" / "data" / "tiktoken")
    return dirs


@functools.cache
def _o200k() -> tiktoken.Encoding:
    """Load the o200k_base encoding from the first local copy found.

    tiktoken's own o200k definition is used for the regex and special tokens,
    with its loader pointed at the local file (the expected hash is still
    checked), so nothing is fetched from the network.
    """
    for directory in _tiktoken_dirs():
        path = directory / _O200K_FILE
        if path.is_file():
            break
    else:
        tried = ", ".join(str(d) for d in _tiktoken_dirs())
        raise FileNotFoundError(f"{_O200K_FILE} not found in any of: {tried}")

    def load_local(_url: str, expected_hash: str | None = None) -> dict[bytes, int]:
        return load_tiktoken_bpe(str(path), expected_hash=expected_hash)

    with patch.object(openai_public, "load_tiktoken_bpe", load_local):
        params = openai_public.o200k_base()
    return tiktoken.Encoding(**params)


def count_o200k_tokens(text: str) -> int:
    """Number of o200k tokens in ``text`` (special-token text counts as plain text)."""
    return len(_o200k().encode_ordinary(text))


# ---------------------------------------------------------------------------
# Public data
# ---------------------------------------------------------------------------


@dataclass
class Received:
    """One request as the mock received it."""

    method: str
    path: str  # without the query string
    query: str  # raw query string, "" if none
    headers: dict[str, str]  # lower-cased names
    body: bytes
    json: Any | None  # parsed JSON body, None if absent or not JSON


@dataclass(frozen=True)
class _Call:
    """The parameters of one metered call, derived from its request body."""

    model: str
    input_tokens: int
    output_tokens: int
    truncated: bool  # output capped by the request's max_tokens
    stream: bool

    @property
    def pieces(self) -> list[str]:
        """The reply, one o200k token per piece: "hello", " hello", ..."""
        return ["hello" if i == 0 else " hello" for i in range(self.output_tokens)]

    @property
    def text(self) -> str:
        return "".join(self.pieces)


def _sse(data: Any, event: str | None = None) -> bytes:
    """One server-sent event, with a compact JSON payload unless ``data`` is a str."""
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {payload}\n\n".encode()


def _text_of(content: Any) -> str:
    """The text of a message content: a string, or the text parts of a list."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            part["text"]
            for part in content
            if isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)
        )
    return ""


# ---------------------------------------------------------------------------
# The two wire formats
# ---------------------------------------------------------------------------


class _OpenAI:
    """OpenAI chat completions: auth, errors, token accounting and replies."""

    name = "openai"

    _ERROR_TYPES: ClassVar[dict[int, tuple[str, str | None]]] = {
        401: ("invalid_request_error", "invalid_api_key"),
        429: ("requests", "rate_limit_exceeded"),
    }

    @staticmethod
    def authorized(headers: dict[str, str], mock_provider: MockProvider) -> bool:
        return headers.get("authorization") == f"Bearer {mock_provider.openai_key}"

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
    def call(body: dict, count: Callable[[str], int], output_tokens: int) -> _Call:
        # OpenAI's documented formula: 3 tokens per message plus the tokens of
        # its role, content and name (+1 for a name), plus 3 priming the reply.
        input_tokens = 3
        for message in body["messages"]:
            input_tokens += 3 + count(str(message.get("role", ""))) + count(_text_of(message.get("content")))
            if "name" in message:
                input_tokens += 1 + count(str(message["name"]))
        limit = body.get("max_completion_tokens", body.get("max_tokens"))
        n = output_tokens if limit is None else min(limit, output_tokens)
        return _Call(body["model"], input_tokens, n, n < output_tokens, body.get("stream") is True)

    @staticmethod
    def usage(call: _Call) -> dict:
        return {
            "prompt_tokens": call.input_tokens,
            "completion_tokens": call.output_tokens,
            "total_tokens": call.input_tokens + call.output_tokens,
            "prompt_tokens_details": {"cached_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": 0},
        }

    @classmethod
    def completion(cls, call: _Call) -> dict:
        return {
            "id": f"chatcmpl-mock{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": call.model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": call.text, "refusal": None},
                    "logprobs": None,
                    "finish_reason": "length" if call.truncated else "stop",
                }
            ],
            "usage": cls.usage(call),
        }

    @classmethod
    def stream(cls, call: _Call, body: dict) -> tuple[list[bytes], list[bytes], list[bytes]]:
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
            return _sse({**base, "choices": [choice], **extra})

        head = [chunk({"role": "assistant", "content": "", "refusal": None})]
        content = [chunk({"content": piece}) for piece in call.pieces]
        tail = [chunk({}, "length" if call.truncated else "stop")]
        if include_usage:
            tail.append(_sse({**base, "choices": [], "usage": cls.usage(call)}))
        tail.append(_sse("[DONE]"))
        return head, content, tail


class _Anthropic:
    """Anthropic messages: auth, errors, token accounting and replies."""

    name = "anthropic"

    _ERROR_TYPES: ClassVar[dict[int, str]] = {
        400: "invalid_request_error",
        401: "authentication_error",
        403: "permission_error",
        404: "not_found_error",
        413: "request_too_large",
        429: "rate_limit_error",
        500: "api_error",
        529: "overloaded_error",
    }

    @staticmethod
    def authorized(headers: dict[str, str], mock_provider: MockProvider) -> bool:
        # Anthropic takes the key as ``x-api-key`` or, as the 2.x SDK sends it,
        # ``Authorization: Bearer``. Every credential sent must be the real key.
        credentials = []
        if "x-api-key" in headers:
            credentials.append(headers["x-api-key"])
        if "authorization" in headers:
            credentials.append(headers["authorization"].removeprefix("Bearer "))
        return bool(credentials) and all(key == mock_provider.anthropic_key for key in credentials)

    @classmethod
    def error(cls, status: int, message: str) -> dict:
        default = "api_error" if status >= 500 else "invalid_request_error"
        return {"type": "error", "error": {"type": cls._ERROR_TYPES.get(status, default), "message": message}}

    @staticmethod
    def invalid(body: Any) -> str | None:
        """Why the request body is unacceptable, or None."""
        if not isinstance(body, dict):
            return "There was an issue with your request body: invalid JSON"
        for field, kind in (("model", str), ("max_tokens", int), ("messages", list)):
            if not isinstance(body.get(field), kind):
                return f"{field}: Field required"
        if not all(isinstance(m, dict) for m in body["messages"]):
            return "messages: Input should be a valid list of objects"
        return None

    @staticmethod
    def call(body: dict, count: Callable[[str], int], output_tokens: int) -> _Call:
        # Not Anthropic's (unpublished) tokenizer, just deterministic: all text
        # tokens, plus 4 per message, plus 3.
        input_tokens = 3 + count(_text_of(body.get("system")))
        for message in body["messages"]:
            input_tokens += 4 + count(_text_of(message.get("content")))
        n = min(body["max_tokens"], output_tokens)
        return _Call(body["model"], input_tokens, n, n < output_tokens, body.get("stream") is True)

    @staticmethod
    def completion(call: _Call) -> dict:
        return {
            "id": f"msg_mock{uuid.uuid4().hex}",
            "type": "message",
            "role": "assistant",
            "model": call.model,
            "content": [{"type": "text", "text": call.text}],
            "stop_reason": "max_tokens" if call.truncated else "end_turn",
            "stop_sequence": None,
            "usage": {
                "input_tokens": call.input_tokens,
                "output_tokens": call.output_tokens,
                "cache_creation_input_tokens": 0,
                "cache_read_input_tokens": 0,
            },
        }

    @staticmethod
    def stream(call: _Call, body: dict) -> tuple[list[bytes], list[bytes], list[bytes]]:
        """The stream's events as (head, one per output token, tail).

        ``body`` is unused here; it is part of the signature shared with ``_OpenAI``.
        """
        message = {
            "id": f"msg_mock{uuid.uuid4().hex}",
            "type": "message",
            "role": "assistant",
            "model": call.model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {
                "input_tokens": call.input_tokens,
                "cache_creation_input_tokens": 0,
                "cache_read_input_tokens": 0,
                "output_tokens": 1,
            },
        }

        def event(name: str, **data: Any) -> bytes:
            return _sse({"type": name, **data}, event=name)

        head = [
            event("message_start", message=message),
            event("content_block_start", index=0, content_block={"type": "text", "text": ""}),
            event("ping"),
        ]
        content = [
            event("content_block_delta", index=0, delta={"type": "text_delta", "text": piece}) for piece in call.pieces
        ]
        tail = [
            event("content_block_stop", index=0),
            event(
                "message_delta",
                delta={"stop_reason": "max_tokens" if call.truncated else "end_turn", "stop_sequence": None},
                usage={"output_tokens": call.output_tokens},
            ),
            event("message_stop"),
        ]
        return head, content, tail


_METERED = {
    ("POST", "/v1/chat/completions"): _OpenAI,
    ("POST", "/v1/messages"): _Anthropic,
}


# ---------------------------------------------------------------------------
# HTTP server
# ---------------------------------------------------------------------------


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128  # the benchmark opens many connections at once

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

        api = _METERED.get((self.command, path))
        if api is not None:
            self._metered(api, request)
        elif (self.command, path) == ("GET", "/v1/models"):
            self._models(request)
        else:
            self._send_json(404, _OpenAI.error(404, f"Invalid URL ({self.command} {path})"))

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
        if not _OpenAI.authorized(request.headers, self.server.mock_provider):
            self._send_json(401, _OpenAI.error(401, "Incorrect API key provided."))
            return
        model = {"id": "gpt-4o-mini", "object": "model", "created": 1721172741, "owned_by": "system"}
        self._send_json(200, {"object": "list", "data": [model]})

    def _metered(self, api: type[_OpenAI | _Anthropic], request: Received) -> None:
        mock_provider = self.server.mock_provider
        if not api.authorized(request.headers, mock_provider):
            self._send_json(401, api.error(401, "Incorrect API key provided."))
            return
        problem = api.invalid(request.json)
        if problem:
            self._send_json(400, api.error(400, problem))
            return
        call = api.call(request.json, mock_provider.count_tokens, mock_provider.output_tokens)

        delay, fail_status, cut_after = mock_provider._take_behaviours(call.stream)
        if delay:
            time.sleep(delay)
        if fail_status is not None:
            self._send_json(fail_status, api.error(fail_status, "Mock failure injected by fail_next()."))
            return

        usage = {
            "provider": api.name,
            "model": call.model,
            "input_tokens": call.input_tokens,
            "output_tokens": call.output_tokens,
            "cached_tokens": 0,
            "stream": call.stream,
        }
        if not call.stream:
            mock_provider._report(usage)
            self._send_json(200, api.completion(call))
            return

        head, content, tail = api.stream(call, request.json)
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        if cut_after is not None:
            self._write_chunks(head + content[:cut_after])
            self._drop_connection()
            return
        self._write_chunks(head + content)
        mock_provider._report(usage)  # before the client can see the end of the stream
        self._write_chunks(tail, last=True)

    def _write_chunks(self, events: list[bytes], last: bool = False) -> None:
        """Send each event as its own HTTP chunk; ``last`` ends the body.

        ``wfile`` is unbuffered, so every write goes straight to the socket.
        """
        for i, event in enumerate(events):
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

    def _send_json(self, status: int, payload: Any) -> None:
        data = json.dumps(payload, separators=(",", ":")).encode()
        self.send_response(status)
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
    ):
        self.openai_key = openai_key
        self.anthropic_key = anthropic_key
        self.output_tokens = output_tokens
        if count_tokens is None:
            _o200k()  # load now: fail fast, and keep it out of the first request's latency
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

    # -- used by the handler ------------------------------------------------

    def _clear_behaviours(self) -> None:
        self._fail_status = 0
        self._fail_count = 0
        self._cut_after: int | None = None
        self._delay = 0.0

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


if __name__ == "__main__":
    main()
