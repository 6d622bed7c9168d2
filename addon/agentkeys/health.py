"""The metrics port: `/metrics` for Prometheus, `/healthz` and `/readyz` for probes, 404 for anything else.

It runs on a thread of its own, so a probe is answered even while the proxy's event loop is busy,
and asks that loop a question with a deadline: a loop that does not answer within
`LOOP_DEADLINE_SECONDS` is a stuck proxy, and `/healthz` says so (a probe then restarts it).

- `/healthz`: the process is alive (its event loop turns).
- `/readyz`: it can take calls: the listeners are up, the CA is loaded, and the key store answers.
  Each check is named in the answer, so a failing probe says which one failed.
"""

import asyncio
import http.client
import json
import logging
import socket
import socketserver
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from agentkeys.ledger import Ledger, LedgerUnavailable

log = logging.getLogger(__name__)

LOOP_DEADLINE_SECONDS = 2.0

# A readiness check: the problem it found, or None.
Check = Callable[[], str | None]


class HealthServer:
    """Serves the metrics port until `stop`.

    `loop_checks` run on the proxy's event loop (they read mitmproxy's state, which lives there);
    `thread_checks` run on this server's thread (they may block, like a store round trip).
    """

    def __init__(
        self,
        registry: CollectorRegistry,
        loop: asyncio.AbstractEventLoop,
        loop_checks: dict[str, Check],
        thread_checks: dict[str, Check],
    ):
        self.registry = registry
        self.loop = loop
        self.loop_checks = loop_checks
        self.thread_checks = thread_checks
        self._server: ThreadingHTTPServer | None = None

    def start(self, host: str, port: int) -> None:
        self._server = serve_http(self, ThreadingHTTPServer, (host, port))

    def start_on_socket(self, path: str) -> None:
        """Serve on a Unix socket instead: a worker's, which only its supervisor asks (`workers.py`)."""
        self._server = serve_http(self, UnixHTTPServer, path)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def alive(self) -> str | None:
        """None if the event loop runs a no-op within the deadline; else why not."""
        return self._on_loop(lambda: {})[1]

    def readiness(self) -> dict[str, str]:
        """Each check's name and "ok" or its problem; all "ok" means ready."""
        found, stuck = self._on_loop(lambda: {name: check() for name, check in self.loop_checks.items()})
        results = found if stuck is None else dict.fromkeys(self.loop_checks, stuck)
        results.update({name: check() for name, check in self.thread_checks.items()})
        return {name: problem or "ok" for name, problem in results.items()}

    def _on_loop(self, function: Callable[[], dict]) -> tuple[dict, str | None]:
        async def call():
            return function()

        try:
            return asyncio.run_coroutine_threadsafe(call(), self.loop).result(LOOP_DEADLINE_SECONDS), None
        except TimeoutError:
            return {}, f"the event loop did not answer within {LOOP_DEADLINE_SECONDS:g}s"
        except RuntimeError:  # the loop is closed: the proxy is stopping
            return {}, "the proxy is stopping"


class UnixHTTPServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True


def serve_http(health, server_class, address) -> socketserver.BaseServer:
    """Answer /metrics, /healthz and /readyz from `health` (anything with `registry`, `alive` and
    `readiness`) on a thread of their own."""
    handler = type("Handler", (HealthRequestHandler,), {"health": health})
    server = server_class(address, handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="agentkeys-health", daemon=True).start()
    return server


class UnixHTTPConnection(http.client.HTTPConnection):
    """An HTTP client connection to a Unix socket (a worker's health server)."""

    def __init__(self, path: str, timeout: float):
        super().__init__("localhost", timeout=timeout)
        self.socket_path = path

    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.socket_path)


def ask_socket(path: str, target: str, timeout: float) -> tuple[int, bytes]:
    """GET `target` from the health server on the Unix socket `path`: its status and body."""
    connection = UnixHTTPConnection(path, timeout)
    try:
        connection.request("GET", target)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


class HealthRequestHandler(BaseHTTPRequestHandler):
    health: HealthServer

    def do_GET(self):
        path = self.path.partition("?")[0]
        if path == "/metrics":
            self._answer(200, generate_latest(self.health.registry), CONTENT_TYPE_LATEST)
        elif path == "/healthz":
            problem = self.health.alive()
            self._answer_json(503 if problem else 200, {"alive": problem is None, "problem": problem})
        elif path == "/readyz":
            checks = self.health.readiness()
            ready = all(result == "ok" for result in checks.values())
            self._answer_json(200 if ready else 503, {"ready": ready, "checks": checks})
        else:
            self._answer(404, b"not found: the metrics port serves /metrics, /healthz and /readyz\n", "text/plain")

    def _answer_json(self, status: int, body: dict) -> None:
        self._answer(status, json.dumps(body).encode() + b"\n", "application/json")

    def _answer(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_HEAD = do_GET

    def log_message(self, format, *args):
        """Probes every few seconds would flood the proxy's log; a failing one is seen in its answer."""


# ----- the checks -----


def listeners_up(master) -> str | None:
    """Every listener mitmproxy was asked for is running."""
    servers = list(master.addons.get("proxyserver").servers)
    if not servers:
        return "no listener is running"
    down = [server.mode.full_spec for server in servers if not server.is_running]
    return f"not listening: {', '.join(down)}" if down else None


def ca_loaded(master) -> str | None:
    """mitmproxy has a CA to sign the provider hosts' certificates with (proxy mode)."""
    certstore = getattr(master.addons.get("tlsconfig"), "certstore", None)
    return None if certstore is not None and certstore.default_ca is not None else "the CA is not loaded"


def store_answers(ledger: Ledger) -> str | None:
    try:
        ledger.ping()
    except LedgerUnavailable as e:
        return str(e)
    return None
