"""How many client connections the proxy keeps, and for how long one may wait without a request.

mitmproxy closes a connection only after `tcp_timeout` of silence, and keeps as many as clients
open: a client that trickles its headers a byte at a time is never silent, and a few hundred idle
ones hold as many file descriptors. This addon closes a connection whose first request has not
arrived within `agentkeys_header_timeout`, or that has had no request in flight for
`agentkeys_idle_timeout`, and keeps at most `agentkeys_max_connections` open: a new one over the
limit takes the place of the longest-waiting connection with no request in flight, so a flood of
idle connections cannot lock out an agent whose call is under way (or about to be).

A tunnel passed through untouched and a WebSocket carry no requests to wait for: only mitmproxy's
own `tcp_timeout` applies to them. A request whose body is still arriving counts as in flight.
"""

import asyncio
import logging
import time
from dataclasses import dataclass

from mitmproxy import connection, ctx, http, tcp

log = logging.getLogger(__name__)

SWEEP_EVERY_SECONDS = 0.5


@dataclass
class ClientState:
    client: connection.Client
    waiting_since: float  # when it connected, or when its last answer went out
    answered: bool = False  # whether a request of this connection has had its answer (then idle_timeout applies)
    in_flight: int = 0
    relayed: bool = False  # a passed-through tunnel or a WebSocket

    def waiting(self) -> bool:
        return not self.relayed and self.in_flight == 0


class ConnectionGuard:
    def __init__(self, clock=time.monotonic):
        self.clock = clock
        self.clients: dict[str, ClientState] = {}
        self._sweeper: asyncio.Task | None = None

    def load(self, loader):
        loader.add_option("agentkeys_max_connections", int, 512, "Client connections open at once.")
        loader.add_option(
            "agentkeys_header_timeout", float, 10.0, "Seconds a new connection has to send its first request."
        )
        loader.add_option(
            "agentkeys_idle_timeout", float, 120.0, "Seconds a connection may stay open with no request in flight."
        )

    def running(self):
        if self._sweeper is None:
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep_forever())

    def done(self):
        if self._sweeper:
            self._sweeper.cancel()

    # ----- hooks -----

    def client_connected(self, client: connection.Client):
        if len(self.clients) >= ctx.options.agentkeys_max_connections:
            waiting = [state for state in self.clients.values() if state.waiting()]
            if not waiting:
                client.error = "agentkeys: too many connections"
                log.warning("agentkeys: refused a connection from %s: every connection is busy", client.peername)
                return
            longest = min(waiting, key=lambda state: state.waiting_since)
            self._close(longest, "to make room for a new connection (agentkeys_max_connections)")
        self.clients[client.id] = ClientState(client, self.clock())

    def client_disconnected(self, client: connection.Client):
        self.clients.pop(client.id, None)

    def requestheaders(self, flow: http.HTTPFlow):
        if state := self.clients.get(flow.client_conn.id):
            state.in_flight += 1

    def response(self, flow: http.HTTPFlow):
        self._answered(flow)

    def error(self, flow: http.HTTPFlow):
        self._answered(flow)

    def tcp_start(self, flow: tcp.TCPFlow):
        self._relayed(flow.client_conn)

    def websocket_start(self, flow: http.HTTPFlow):
        self._relayed(flow.client_conn)

    # ----- the rules -----

    def _answered(self, flow: http.HTTPFlow):
        state = self.clients.get(flow.client_conn.id)
        if state and state.in_flight:
            state.in_flight -= 1
            state.answered = True
            state.waiting_since = self.clock()

    def _relayed(self, client: connection.Client):
        if state := self.clients.get(client.id):
            state.relayed = True

    def overdue(self, now: float) -> list[ClientState]:
        """Connections waiting for a request longer than they may."""
        options = ctx.options
        return [
            state
            for state in self.clients.values()
            if state.waiting()
            and now - state.waiting_since
            > (options.agentkeys_idle_timeout if state.answered else options.agentkeys_header_timeout)
        ]

    async def _sweep_forever(self):
        while True:
            await asyncio.sleep(SWEEP_EVERY_SECONDS)
            try:
                for state in self.overdue(self.clock()):
                    self._close(state, "waited too long for a request")
            except Exception:
                log.exception("agentkeys: closing idle connections failed; will try again")

    def _close(self, state: ClientState, why: str):
        self.clients.pop(state.client.id, None)
        handler = next(
            (h for h in ctx.master.addons.get("proxyserver").connections.values() if h.client is state.client), None
        )
        io = handler.transports.get(state.client) if handler else None
        if io and io.handler:
            log.debug("agentkeys: closing the connection from %s: %s", state.client.peername, why)
            io.handler.cancel(why)
