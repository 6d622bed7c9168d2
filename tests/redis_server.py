"""A throwaway redis-server for tests: in memory only, on a free local port, easy to kill and bring back.

Fault tests stop it mid-run (`kill()` is a crash, `stop()` a clean shutdown) and `start()` it again on
the same port, so clients that hold its URL can show they recover without being rebuilt. Nothing is
persisted: a restarted server is empty, as a replacement instance would be.
"""

import shutil
import signal
import socket
import subprocess
import tempfile
import time

import redis

REDIS_SERVER = shutil.which("redis-server")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    def __init__(self, port: int | None = None, *settings: str):
        """`settings`: more redis-server arguments (`--maxmemory-policy`, `allkeys-lru`, ...)."""
        self.port = port or free_port()
        self.settings = settings
        self._process: subprocess.Popen | None = None
        self._dir = tempfile.TemporaryDirectory(prefix="agentkeys-redis-")

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10) -> str:
        """Start (or restart) the server on this object's port; returns its URL once it answers PING."""
        if self._process is not None:
            raise RuntimeError(f"redis-server on {self.port} is already running")
        if REDIS_SERVER is None:
            raise RuntimeError("redis-server is not installed")
        with open(f"{self._dir.name}/redis.log", "ab") as log:  # the child keeps its own copy of the file
            self._process = subprocess.Popen(
                [
                    REDIS_SERVER,
                    "--port", str(self.port), "--bind", "127.0.0.1",
                    "--save", "", "--appendonly", "no", "--dir", self._dir.name,
                    "--enable-debug-command", "local",  # DEBUG SLEEP: a server busy past the clients' timeout
                    *self.settings,
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )  # fmt: skip
        self._wait_until_ready(timeout)
        return self.url

    def _wait_until_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        with redis.Redis(port=self.port, socket_connect_timeout=0.2, socket_timeout=0.5) as client:
            while True:
                if self._process.poll() is not None:
                    self._process = None
                    raise RuntimeError(f"redis-server exited on port {self.port}:\n{self.log()}")
                try:
                    client.ping()
                    return
                except redis.ConnectionError:
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"redis-server did not answer on {self.port}:\n{self.log()}") from None
                    time.sleep(0.02)

    def log(self) -> str:
        with open(f"{self._dir.name}/redis.log", errors="replace") as f:
            return f.read()

    def flushdb(self) -> None:
        with redis.Redis(port=self.port) as client:
            client.flushdb()

    def busy(self, seconds: float) -> None:
        """Keep the server busy (answering nobody) for `seconds`, from another client: `DEBUG SLEEP`."""
        with redis.Redis(port=self.port, socket_timeout=seconds + 10) as client:
            client.execute_command("DEBUG", "SLEEP", seconds)

    def key_count(self) -> int:
        with redis.Redis(port=self.port) as client:
            return client.dbsize()

    def kill(self) -> None:
        """A crash: SIGKILL, no goodbye to connected clients."""
        self._end(signal.SIGKILL)

    def stop(self) -> None:
        """A clean shutdown (SIGTERM)."""
        self._end(signal.SIGTERM)

    def pause(self) -> None:
        """Unreachable but alive (SIGSTOP): connections hang, as behind a network partition."""
        self._process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        self._process.send_signal(signal.SIGCONT)

    def _end(self, sig: signal.Signals) -> None:
        if self._process is None:
            return
        self._process.send_signal(sig)
        try:
            self._process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        self._process = None

    def close(self) -> None:
        """Stop the server and remove its folder."""
        self.stop()
        self._dir.cleanup()

    def __enter__(self) -> "RedisServer":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()
