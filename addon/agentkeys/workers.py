"""`agentkeys serve --workers N`: N proxy processes behind one supervisor, so a proxy uses every core.

One proxy is one asyncio loop on one core. The supervisor binds the listeners once and every worker
accepts from those same sockets, inherited: the kernel hands each new connection to whichever worker
accepts it first. Sockets bound once rather than SO_REUSEPORT, because mitmproxy (11 and 12) has no
option for SO_REUSEPORT; because with it any other process of the same user could join the port;
because a worker that stops would drop the connections waiting in its own queue; and because a port
of 0 is then chosen once for all.

What the workers share, and how:
- the store: each opens the config's (one SQLite file, or Redis); every operation that moves money is
  atomic in the store, as it is between replicas;
- the CA and the audit signing key: made before any worker starts;
- the audit log: each worker writes a slot of its own (`auditfiles`: `audit.jsonl`, `audit.w2.jsonl`,
  …) with a chain of its own, so no two processes append to one file;
- their output: each worker's stdout and stderr come to the supervisor through pipes and are copied
  whole line by whole line, so log lines (and audit records on stdout) are never torn or interleaved;
- the metrics port: served by the supervisor; `/metrics` asks every worker and sums their series;
  `/healthz` and `/readyz` ask every worker too. A worker answers on a Unix socket in the abstract
  namespace (no file: the root file system may be read-only), named afresh at each start with a
  random part, so no other process can stand in for it.

Metrics are summed by asking the workers rather than by prometheus-client's multiprocess mode: that
mode cannot carry a custom collector (the budgets per policy, read from the store), a gauge read when
scraped (the open holds) or an Info (the build), and leaves a file per process behind to clean up.

Signals: SIGTERM, SIGINT and SIGHUP are passed to every worker (SIGTERM drains each, SIGHUP reloads
each). A worker that dies is started again; the holds of its calls in flight stay in the store until
the crash rule sweeps them (`stale_hold_after`, charged in full), as for any proxy that dies. A worker
that cannot start at all stops the others, and `serve` exits with its status. A worker whose
supervisor is gone (killed outright) stops by itself: it watches a pipe whose other end only the
supervisor holds.
"""

import asyncio
import json
import logging
import os
import secrets
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from http.server import ThreadingHTTPServer

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.parser import text_string_to_metric_families

from agentkeys.health import ask_socket, serve_http
from agentkeys.logs import JsonFormatter

log = logging.getLogger(__name__)

WORKER_ENV = "AGENTKEYS_WORKER"  # a worker's instructions, as JSON
BACKLOG = 1024  # connections waiting to be accepted, per listener
ASK_SECONDS = 3.0  # for a worker to answer its supervisor's /metrics, /healthz or /readyz
START_SECONDS = 60.0  # for a worker to answer at all after it starts
RESTART_DELAYS = (0.5, 1, 2, 5, 10, 30)  # before each restart of a worker that keeps dying; reset once it lasts
LASTED_SECONDS = 60.0
STOP_SLACK_SECONDS = 10.0  # past the config's shutdown grace, before a worker that does not stop is killed
LINE_LIMIT = 16 * 1024 * 1024  # longest output line copied whole
# Series every worker reads from the store (or the build), the same in each: given once, not summed.
SHARED_SERIES = frozenset({"agentkeys_budget_remaining_usd", "agentkeys_keys_active", "agentkeys_build_info"})


def default_workers() -> int:
    """The cores this process may run on (a container's CPU set, not the machine's)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


# ----- listeners -----


def mode_address(mode: str, settings: dict) -> tuple[str, int]:
    """Where mitmproxy would listen for `mode` (a --mode spec), as it will ask its event loop for it."""
    from mitmproxy.proxy import mode_specs

    spec = mode_specs.ProxyMode.parse(mode)
    return spec.listen_host(settings.get("listen_host", "")), spec.listen_port(settings.get("listen_port"))


def bind(host: str, port: int) -> socket.socket:
    if host == "" and socket.has_dualstack_ipv6():  # every address, as mitmproxy listens for an empty host
        return socket.create_server(("", port), family=socket.AF_INET6, dualstack_ipv6=True, backlog=BACKLOG)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return socket.create_server((host, port), family=family, backlog=BACKLOG)


def bind_listeners(modes: list[str], settings: dict) -> tuple[list[str], dict[tuple[str, int], socket.socket]]:
    """A socket bound for each mode's address; the modes with a port of 0 replaced by the one chosen."""
    bound_modes, sockets = [], {}
    for mode in modes:
        host, port = mode_address(mode, settings)
        try:
            listener = bind(host, port)
        except OSError as e:  # as mitmproxy says it, naming the listener
            for bound in sockets.values():
                bound.close()
            raise OSError(e.errno, f"{mode} failed to listen on {host or '*'}:{port} with {e}") from None
        if port == 0:
            port = listener.getsockname()[1]
            mode = f"{mode.rpartition('@')[0]}@{f'[{host}]' if ':' in host else host}:{port}"
        sockets[(host, port)] = listener
        bound_modes.append(mode)
    return bound_modes, sockets


class InheritedListeners(asyncio.SelectorEventLoop):
    """A worker's event loop: a server asked for an address the supervisor bound accepts on its socket.

    mitmproxy opens each listener with `asyncio.start_server(handler, host, port)`, which asks the
    running loop to create the server: this is the one place a worker differs from a lone proxy.
    """

    def __init__(self, sockets: dict[tuple[str, int], socket.socket]):
        super().__init__()
        self.sockets = sockets

    async def create_server(self, protocol_factory, host=None, port=None, **kwargs):
        inherited = self.sockets.get((host or "", port))
        if inherited is None:
            return await super().create_server(protocol_factory, host, port, **kwargs)
        # A copy: mitmproxy closes its server on SIGTERM; the supervisor's socket stays for the others.
        # asyncio accepts up to `backlog` waiting connections each time the socket is ready: with 1, a
        # worker takes one and leaves the rest to whichever worker is free, so a burst of connections
        # spreads over the workers instead of all going to the first awake. The queue the kernel keeps
        # is then set back to BACKLOG (the shared socket's, for every worker).
        server = await super().create_server(protocol_factory, sock=inherited.dup(), backlog=1, **kwargs)
        inherited.listen(BACKLOG)
        return server


# ----- a worker -----


def worker_main() -> int:
    """A worker process: `agentkeys serve` on the supervisor's sockets, its health on a Unix socket."""
    from agentkeys.server import serve

    orders = json.loads(os.environ.pop(WORKER_ENV))
    sockets = {(host, port): socket.socket(fileno=descriptor) for host, port, descriptor in orders["listeners"]}
    settings = {**orders["settings"], "agentkeys_health_socket": orders["health_socket"]}
    return serve(
        settings,
        orders["modes"],
        orders["log_format"],
        loop_factory=lambda: InheritedListeners(sockets),
        lifeline=orders["lifeline"],
    )


# ----- the supervisor -----


@dataclass
class Worker:
    number: int
    health_socket: str = ""
    process: asyncio.subprocess.Process | None = None
    started_at: float = 0.0
    failures: int = 0  # deaths in a row, each before it had lasted LASTED_SECONDS
    restarts: int = 0
    relays: list[asyncio.Task] = field(default_factory=list)

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.returncode is None


class Supervisor:
    def __init__(self, count: int, settings: dict, modes: list[str], log_format: str, grace_seconds: float):
        self.settings = settings
        self.log_format = log_format
        self.grace_seconds = grace_seconds
        self.modes, self.listeners = bind_listeners(modes, settings)
        self.workers = [Worker(n) for n in range(1, count + 1)]
        self._lifeline_read, self._lifeline_write = os.pipe()  # the write end stays here, unshared
        self._stopping = False
        self._stopped = asyncio.Event()

    async def run(self, metrics_address: tuple[str, int] | None) -> int:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self.stop, signum)
        loop.add_signal_handler(signal.SIGHUP, self.tell_all, signal.SIGHUP)
        health = None
        try:
            if metrics_address:
                health = serve_http(FleetHealth(self), ThreadingHTTPServer, metrics_address)
            for worker in self.workers:
                await self._start(worker)
            failed = await self._all_answering()
            if failed is not None:
                self.stop(signal.SIGTERM)
                await self._wait_for_all()
                return failed
            log.info("agentkeys: %d workers serving %s", len(self.workers), ", ".join(self.modes))
            keepers = [asyncio.create_task(self._keep_running(worker)) for worker in self.workers]
            await self._stopped.wait()
            await self._wait_for_all()
            for keeper in keepers:
                keeper.cancel()
            return 0
        finally:
            if health is not None:
                health.shutdown()
                health.server_close()
            self._close()

    def stop(self, signum: int) -> None:
        """Pass the signal on; the listeners close here too, so that only the workers' copies remain."""
        if not self._stopping:
            self._stopping = True
            for listener in self.listeners.values():
                listener.close()
        self.tell_all(signum)
        self._stopped.set()

    def tell_all(self, signum: int) -> None:
        for worker in self.workers:
            if worker.running:
                worker.process.send_signal(signum)

    async def _start(self, worker: Worker) -> None:
        worker.health_socket = f"\0agentkeys-{secrets.token_hex(8)}-worker-{worker.number}"
        orders = {
            "settings": self.settings,
            "modes": self.modes,
            "log_format": self.log_format,
            "listeners": [[host, port, listener.fileno()] for (host, port), listener in self.listeners.items()],
            "health_socket": worker.health_socket,
            "lifeline": self._lifeline_read,
        }
        worker.process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "agentkeys.workers",
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            pass_fds=[*(listener.fileno() for listener in self.listeners.values()), self._lifeline_read],
            env={**os.environ, WORKER_ENV: json.dumps(orders)},
            limit=LINE_LIMIT,
        )  # fmt: skip
        worker.started_at = time.monotonic()
        worker.relays = [
            asyncio.create_task(copy_lines(worker.process.stdout, sys.stdout.buffer)),
            asyncio.create_task(copy_lines(worker.process.stderr, sys.stderr.buffer)),
        ]

    async def _all_answering(self) -> int | None:
        """Wait until every worker answers on its socket; the exit status of one that died first, if any."""
        deadline = time.monotonic() + START_SECONDS
        waiting = list(self.workers)
        while waiting and time.monotonic() < deadline:
            if self._stopping:  # told to stop while starting: not a failure of the workers
                return None
            for worker in list(waiting):
                if not worker.running:
                    await asyncio.gather(*worker.relays)  # its last words are in the log before ours
                    log.error(
                        "agentkeys: worker %d could not start (status %s)", worker.number, worker.process.returncode
                    )
                    return worker.process.returncode or 1
                if await asyncio.to_thread(answers, worker):
                    waiting.remove(worker)
            await asyncio.sleep(0.05)
        if waiting:
            log.error("agentkeys: worker %d did not answer within %ds of starting", waiting[0].number, START_SECONDS)
            return 1
        return None

    async def _keep_running(self, worker: Worker) -> None:
        """Start the worker again each time it dies, waiting longer while it keeps dying young."""
        while True:
            status = await worker.process.wait()
            await asyncio.gather(*worker.relays)
            if self._stopping:
                return
            lasted = time.monotonic() - worker.started_at
            worker.failures = 0 if lasted >= LASTED_SECONDS else worker.failures + 1
            delay = RESTART_DELAYS[min(worker.failures, len(RESTART_DELAYS) - 1)]
            log.warning(
                "agentkeys: worker %d (pid %d) stopped with status %s after %.0fs; starting it again in %gs."
                " Holds of its calls in flight are charged in full once older than stale_hold_after",
                worker.number, worker.process.pid, status, lasted, delay,
            )  # fmt: skip
            await asyncio.sleep(delay)
            if self._stopping:
                return
            worker.restarts += 1
            await self._start(worker)

    async def _wait_for_all(self) -> None:
        """Every worker has stopped: gracefully within their grace, else killed."""
        running = [worker.process for worker in self.workers if worker.running]
        if not running:
            return
        _, late = await asyncio.wait(
            [asyncio.create_task(process.wait()) for process in running],
            timeout=self.grace_seconds + STOP_SLACK_SECONDS,
        )
        if late:
            log.error("agentkeys: %d workers did not stop within their grace; killing them", len(late))
            for process in running:
                if process.returncode is None:
                    process.kill()
            await asyncio.gather(*(process.wait() for process in running))
        await asyncio.gather(*(relay for worker in self.workers for relay in worker.relays))

    def _close(self) -> None:
        for listener in self.listeners.values():
            listener.close()
        os.close(self._lifeline_read)
        os.close(self._lifeline_write)


def answers(worker: Worker) -> bool:
    try:
        return ask_socket(worker.health_socket, "/healthz", ASK_SECONDS)[0] == 200
    except OSError:
        return False


async def copy_lines(reader: asyncio.StreamReader, out) -> None:
    """Copy a worker's output to ours a whole line at a time; a last line cut short stays a line of its own."""
    while True:
        try:
            line = await reader.readuntil(b"\n")
        except asyncio.IncompleteReadError as end:
            if end.partial:
                _write(out, end.partial + b"\n")
            return
        except asyncio.LimitOverrunError as long:  # longer than LINE_LIMIT: copied in pieces
            line = await reader.readexactly(long.consumed)
        _write(out, line)


def _write(out, data: bytes) -> None:
    try:
        out.write(data)
        out.flush()
    except OSError:  # our own output is gone; the workers go on, and so do their audit files
        pass


# ----- the metrics port -----


class FleetHealth:
    """The metrics port's answers for all workers: what `health.HealthRequestHandler` asks of a proxy."""

    def __init__(self, supervisor: Supervisor):
        self.supervisor = supervisor
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(FleetMetrics(supervisor))

    def alive(self) -> str | None:
        """None if every running worker's event loop turns; else which ones do not."""
        problems = []
        for worker in self.supervisor.workers:
            if worker.running:
                status, body = _ask(worker, "/healthz")
                if status != 200:
                    problems.append(f"worker {worker.number}: {_problem(body)}")
        return "; ".join(problems) or None

    def readiness(self) -> dict[str, str]:
        """Each worker's readiness: "ok", or the checks it failed."""
        checks = {}
        for worker in self.supervisor.workers:
            if not worker.running:
                checks[f"worker {worker.number}"] = "starting again"
                continue
            status, body = _ask(worker, "/readyz")
            failed = {name: result for name, result in _checks(body).items() if result != "ok"}
            checks[f"worker {worker.number}"] = (
                "ok"
                if status == 200
                else "; ".join(f"{name}: {result}" for name, result in failed.items()) or _problem(body)
            )
        return checks


def _ask(worker: Worker, target: str) -> tuple[int, bytes]:
    try:
        return ask_socket(worker.health_socket, target, ASK_SECONDS)
    except OSError as e:
        return 503, json.dumps({"problem": f"does not answer ({e})"}).encode()


def _problem(body: bytes) -> str:
    try:
        return json.loads(body).get("problem") or "not ready"
    except ValueError:
        return body.decode(errors="replace").strip()


def _checks(body: bytes) -> dict[str, str]:
    try:
        return json.loads(body).get("checks", {})
    except ValueError:
        return {}


class FleetMetrics:
    """The workers' series, summed (the shared ones given once), and the supervisor's own."""

    def __init__(self, supervisor: Supervisor):
        self.supervisor = supervisor

    def collect(self):
        texts = []
        for worker in self.supervisor.workers:
            if worker.running:
                status, body = _ask(worker, "/metrics")
                if status == 200:
                    texts.append(body.decode())
        yield from merged_families(texts)
        running = GaugeMetricFamily("agentkeys_workers", "Worker processes running")
        running.add_metric([], sum(worker.running for worker in self.supervisor.workers))
        yield running
        restarts = CounterMetricFamily("agentkeys_worker_restarts", "Workers started again after they died")
        restarts.add_metric([], sum(worker.restarts for worker in self.supervisor.workers))
        yield restarts


def merged_families(texts: list[str]) -> list:
    """The metric families of several exposition texts, each series summed across them.

    A series that is a view of the shared store (`SHARED_SERIES`) is taken from the first text only.
    """
    families, positions = {}, {}
    for text in texts:
        for family in text_string_to_metric_families(text):
            merged = families.get(family.name)
            if merged is None:
                families[family.name] = family
                positions[family.name] = {_series(sample): i for i, sample in enumerate(family.samples)}
                continue
            if family.name in SHARED_SERIES:
                continue
            where = positions[family.name]
            for sample in family.samples:
                i = where.get(_series(sample))
                if i is None:
                    where[_series(sample)] = len(merged.samples)
                    merged.samples.append(sample)
                else:
                    merged.samples[i] = merged.samples[i]._replace(value=merged.samples[i].value + sample.value)
    for family in families.values():
        family.samples.sort(key=_exposition_order)
    return list(families.values())


def _series(sample) -> tuple:
    return sample.name, tuple(sorted(sample.labels.items()))


def _exposition_order(sample) -> tuple:
    """A series' samples together, a histogram's buckets in order of their bound."""
    labels = tuple(sorted((name, value) for name, value in sample.labels.items() if name != "le"))
    bound = float(sample.labels.get("le", "inf").replace("+Inf", "inf"))
    return labels, sample.name.endswith("_bucket") is False, bound, sample.name


def supervise(count: int, settings: dict, modes: list[str], log_format: str, config) -> int:
    """Run `count` workers until SIGINT or SIGTERM; the exit status of `serve`."""
    try:
        supervisor = Supervisor(count, settings, modes, log_format, config.shutdown_grace)
    except OSError as e:
        print(f"agentkeys: {e.strerror}", file=sys.stderr)
        return 1
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter("%(message)s"))
    logging.basicConfig(level=logging.INFO, handlers=[handler])
    metrics = (config.listen_host, config.metrics_port) if config.metrics_port else None
    try:
        return asyncio.run(supervisor.run(metrics))
    except OSError as e:  # the metrics port is taken; the listeners are closed by then
        print(f"agentkeys: the metrics port {config.listen_host}:{config.metrics_port}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(worker_main())
