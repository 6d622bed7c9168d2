"""`agentkeys serve`: mitmproxy's proxy core with the Agent Keys addon, and nothing else.

mitmdump loads some thirty addons (replay, map-local, cookie stickiness, HAR export, …) and asks
every one of them about every event of every flow; none of them has work to do in this proxy, and
asking them all is a large share of a call's CPU (docs/performance.md has the figure).

This keeps the ones a proxy needs: its listeners (proxyserver, next_layer, tlsconfig), its safety
checks (block: refuse clients from public addresses unless configured; disable_h2c: no cleartext
HTTP/2 upgrade smuggling; update_alt_svc), its own options and commands (core), start-up error
reporting (errorcheck) and the log (termlog). The addon still loads into a full mitmdump as a
script (see `addon.py`).
"""

import asyncio
import logging
import signal
import sys

from mitmproxy import exceptions, master, options
from mitmproxy.addons import block, core, disable_h2c, errorcheck, next_layer, proxyserver, tlsconfig, update_alt_svc

from agentkeys.addon import AgentKeys
from agentkeys.connections import ConnectionGuard
from agentkeys.logguard import LogGuard
from agentkeys.logs import JsonFormatter


class ProxyMaster(master.Master):
    def __init__(self, opts: options.Options, log_format: str = "text"):
        super().__init__(opts, with_termlog=True)
        if log_format == "json":  # the terminal log keeps its verbosity option; only its lines change shape
            self._termlog_addon.logger.setFormatter(JsonFormatter())
        self.agentkeys = AgentKeys()
        self.addons.add(
            core.Core(),
            block.Block(),
            disable_h2c.DisableH2C(),
            proxyserver.Proxyserver(),
            next_layer.NextLayer(),
            tlsconfig.TlsConfig(),
            update_alt_svc.UpdateAltSvc(),
            LogGuard(),
            ConnectionGuard(),
            self.agentkeys,
            errorcheck.ErrorCheck(),
        )
        self._draining: asyncio.Task | None = None

    def drain(self) -> None:
        """SIGTERM: stop accepting connections, let the calls in flight finish (up to the config's
        `shutdown_grace`) and settle, then stop. A second SIGTERM stops at once."""
        if self._draining is not None:
            self.shutdown()
            return
        self._draining = asyncio.get_running_loop().create_task(self._drain_then_stop())

    async def _drain_then_stop(self) -> None:
        grace = self.agentkeys.config.shutdown_grace
        logging.info("agentkeys: stopping: no new connections; calls in flight have %ds to finish", grace)
        self.options.update(mode=[])
        await self.agentkeys.drain(grace)
        self.shutdown()


def serve(
    settings: dict, modes: list[str], log_format: str = "text", loop_factory=None, lifeline: int | None = None
) -> int:
    """Run until SIGINT (at once) or SIGTERM (gracefully); SIGHUP reloads the config.

    `settings` are mitmproxy and agentkeys_* options by name; `log_format` is "text" or "json". A
    worker (`workers.py`) gives the loop that listens on its supervisor's sockets, and the pipe whose
    closing says that its supervisor is gone.
    """
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        return runner.run(_serve(settings, modes, log_format, lifeline))


async def _serve(settings: dict, modes: list[str], log_format: str, lifeline: int | None) -> int:
    logging.getLogger().setLevel(logging.INFO)
    proxy = ProxyMaster(options.Options(), log_format)
    unknown = sorted(set(settings) - set(proxy.options.keys()))
    if unknown:
        print(f"agentkeys: no such mitmproxy option in agentkeys serve: {', '.join(unknown)}", file=sys.stderr)
        return 2
    try:
        proxy.options.update(mode=modes, **settings)
    except (exceptions.OptionsError, TypeError) as e:  # mitmproxy's type check raises TypeError
        print(f"agentkeys: {e}", file=sys.stderr)
        return 2
    if proxy.options.termlog_verbosity == "debug":  # else debug records are not even made (several per call)
        logging.getLogger().setLevel(logging.DEBUG)
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGINT, proxy.shutdown)
    loop.add_signal_handler(signal.SIGTERM, proxy.drain)
    loop.add_signal_handler(signal.SIGHUP, proxy.agentkeys.reload)
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)  # a client gone mid-write is an error to handle, not a death
    if lifeline is not None:

        def orphaned():  # the supervisor died without a word (SIGKILL): stop as if it had said SIGTERM
            loop.remove_reader(lifeline)
            proxy.drain()

        loop.add_reader(lifeline, orphaned)
    await proxy.run()
    return 0
