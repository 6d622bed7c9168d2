"""The mitmproxy addon: hooks that turn flows into the gate's plain data and back.

Routing (`routing.py`) says where a request goes, the gate (`gate.py`) decides, and this module
only translates: a flow becomes a CallRequest, a Denial becomes the provider's own error shape, an
Admission becomes a rewritten request, and what happened to the call becomes an Outcome that the
gate settles. Every hook catches its own errors: mitmproxy logs a raising hook and lets the flow
continue, which here would mean forwarding unchecked.

Loads as `agentkeys serve` or as a plain script: `mitmdump -s .../agentkeys/addon.py
--set agentkeys_config=agentkeys.yaml`.
"""

import asyncio
import contextlib
import gc
import json
import logging
import math
import sys
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from mitmproxy import connection, ctx, exceptions, http, tcp, tls
from mitmproxy.net.http.http1 import assemble_response
from mitmproxy.proxy.layers.http import _http1, _http2
from mitmproxy.proxy.mode_specs import ReverseMode, TransparentMode

from agentkeys import logs
from agentkeys.alerts import ALERTED_REFUSALS, Alerts, sender_for
from agentkeys.audit import AuditLog, CallRecord, audit_log_for
from agentkeys.calls import CallRequest, Denial, Outcome
from agentkeys.connections import ConnectionGuard
from agentkeys.control import Control, issuers_from
from agentkeys.credentials import CREDENTIAL_HEADERS, proxy_auth_user, without_query_credentials
from agentkeys.gate import LARGE_BODY_BYTES, Admission, Gate
from agentkeys.health import HealthServer, ca_loaded, listeners_up, store_answers
from agentkeys.identity import identities_from
from agentkeys.ledger import LedgerUnavailable, StoreMisconfigured, open_ledger
from agentkeys.ledger.counted import ErrorCountingLedger
from agentkeys.logguard import LogGuard
from agentkeys.metrics import Metrics
from agentkeys.money import dumps, micros_to_usd
from agentkeys.plans import PlanFile, admin_token, current_plans
from agentkeys.policy import ProxyConfig, current_policies, load_config
from agentkeys.pricing import Usage
from agentkeys.providers import FORMATS
from agentkeys.providers.base import (
    DenyKind,
    RequestFacts,
    SseEventTooLarge,
    SseSplitter,
    StreamMeter,
    UsageRejected,
    WireFormat,
)
from agentkeys.realkeys import RealKeyCall, observe
from agentkeys.records import (
    Timings,
    Traffic,
    allowed_record,
    control_record,
    denied_record,
    egress_record,
    llm_host_record,
    real_key_record,
    stale_hold_record,
)
from agentkeys.routing import (
    BadPath,
    ControlRoute,
    NoEndpoint,
    NoProvider,
    OtherHost,
    ProviderRoute,
    Router,
    UnknownLlmHost,
    Upstream,
    host_conflict,
)
from agentkeys.seal import store_seal
from agentkeys.settlement import Settlement, charge_for
from agentkeys.store import Store
from agentkeys.yamlfile import ConfigError

if TYPE_CHECKING:
    from agentkeys.admin import AdminServer

log = logging.getLogger(__name__)

STATE = "agentkeys"
SETTLING_SECONDS = 5  # how long settlements already under way may take to be written, at a reload or a stop
CONTROL_PROVIDER = "agentkeys"  # how control calls appear in the audit log
# Whether the official SDKs should try a refused call again. A rate limit says when (`retry_headers`);
# a spent budget, a broken loop, or a call larger than a whole minute's tokens never passes by retrying.
RETRY_HEADER = {
    DenyKind.BUDGET: "false", DenyKind.UNAVAILABLE: "true", DenyKind.NOT_CONFIGURED: "false",
    DenyKind.RATE_LIMITED: "false", DenyKind.LOOP: "false",
}  # fmt: skip
# Told to the agent on every forwarded call, in USD: what this call cost, what its key has left.
COST_HEADER = "x-agentkeys-cost"
REMAINING_HEADER = "x-agentkeys-budget-remaining"
CLAMPED_HEADER = "x-agentkeys-max-tokens-clamped"
CREDENTIAL_FIELDS = frozenset(name.encode() for name in CREDENTIAL_HEADERS)
# Replaced on every forwarded request: the agent's credentials, and its accept-encoding (see `forward`).
REPLACED_REQUEST_FIELDS = CREDENTIAL_FIELDS | {b"accept-encoding"}
REDACTED = b"[redacted by agentkeys]"


@dataclass
class StreamRelay:
    """The `flow.response.stream` callable: passes complete SSE events on as they arrive, metering them."""

    meter: StreamMeter
    splitter: SseSplitter = field(default_factory=SseSplitter)
    first_chunk_at: float | None = None
    broken: bool = False
    seconds_spent: float = 0.0

    def __call__(self, chunk: bytes) -> list[bytes]:
        """Return the chunks to send on. Never `b""` for a chunk: mitmproxy would end the response there."""
        started = time.perf_counter()
        if self.first_chunk_at is None and chunk:
            self.first_chunk_at = time.time()
        try:
            if not chunk:
                return non_empty(self.splitter.flush())
            if self.broken:
                return [chunk]
            # The events passed on, as one chunk: mitmproxy sends each item it is given as a write of its own.
            passed = b"".join([event.raw for event in self.splitter.feed(chunk) if self.meter.feed(event)])
            return [passed] if passed else []
        except SseEventTooLarge as too_large:
            log.warning("agentkeys: %s; passing the rest of the stream through, charged its full hold", too_large)
            self.broken = True
            return non_empty(too_large.held)
        except Exception:
            # Never cut the agent's stream over our own bug; the call is then charged its full hold.
            log.exception("agentkeys: stream metering failed; passing the rest through")
            self.broken = True
            return non_empty(self.splitter.flush(), chunk)
        finally:
            self.seconds_spent += time.perf_counter() - started


def non_empty(*chunks: bytes) -> list[bytes]:
    return [chunk for chunk in chunks if chunk]


@dataclass
class CallState:
    """What one flow carries between hooks, in `flow.metadata[STATE]`."""

    call: CallRequest
    wire: WireFormat
    gate: Gate  # the gate that admitted it, which settles it (a reload may bring a new one meanwhile)
    admission: Admission | None = None
    observed: RealKeyCall | None = None  # a real key's call, passed on untouched (real_keys: audit)
    forwarded: bool = False
    relay: StreamRelay | None = None
    usage: Usage | None = None  # of a whole (not streamed) response, read once for its headers and settlement
    usage_rejected: str | None = None  # why that usage was not believed (UsageRejected)
    usage_read: bool = False
    overhead_seconds: float = 0.0
    finished: bool = False

    @property
    def facts(self) -> RequestFacts | None:
        """What the request says (model, stream, …): the admitted call's, or a real key's call's if it was read."""
        return self.admission.facts if self.admission else self.observed.facts


class AgentKeys:
    def __init__(self):
        self.config: ProxyConfig | None = None
        self.router: Router | None = None
        self.gate: Gate | None = None
        self.control: Control | None = None
        self.audit: AuditLog | None = None
        self.alerts: Alerts | None = None
        self.metrics = Metrics()
        # The key given as the HTTPS_PROXY user, for every flow of its client connection.
        self.tunnel_credentials: weakref.WeakKeyDictionary[connection.Client, str] = weakref.WeakKeyDictionary()
        self.health: HealthServer | None = None
        self.admin: AdminServer | None = None
        self.plans: dict[str, PlanFile] = {}
        self._purge_task: asyncio.Task | None = None
        self._background: set[asyncio.Task] = set()  # settlements and retired stores, until they finish
        self._calls_in_flight = 0  # forwarded and not yet settled and audited
        self._warned_llm_hosts: set[str] = set()  # unconfigured LLM hosts already named in the log

    # ----- set-up -----

    def load(self, loader):
        answer_proxy_errors_as_json()
        loader.add_option("agentkeys_config", str, "", "Agent Keys proxy config file (YAML).")
        loader.add_option("agentkeys_store", str, "", "Agent Keys store URL; overrides the config's `store`.")
        loader.add_option("agentkeys_audit_log", str, "", "Audit log path; overrides the config's `audit_log`.")
        loader.add_option(
            "agentkeys_metrics_port", int, -1, "Prometheus port; overrides the config's (0 turns metrics off)."
        )
        loader.add_option(
            "agentkeys_health_socket", str, "", "A worker's Unix socket for its supervisor; replaces the metrics port."
        )

    def configure(self, updated: set[str]):
        if not any(name.startswith("agentkeys_") for name in updated):
            return
        try:
            self._apply(self._read_config())
        except ConfigError as e:
            raise exceptions.OptionsError(f"agentkeys: bad config:\n{e}") from None
        except StoreMisconfigured as e:
            raise exceptions.OptionsError(f"agentkeys: refusing the store: {e}") from None

    def reload(self):
        """SIGHUP: read the config, prices, issuers and their policy files again, keeping every connection.

        A file that does not load leaves the running config in place, and the log says why.
        """
        try:
            self._apply(self._read_config())
        except (ConfigError, OSError, ValueError, StoreMisconfigured) as e:
            log.error("agentkeys: reload refused; the running config stays:\n%s", e)
            return
        log.info("agentkeys: reloaded the config, prices, issuers and policies")

    def _apply(self, config: ProxyConfig):
        """Put a config in force; raises ConfigError (before changing anything) if one of its files is bad.

        Calls in flight settle with the gate that admitted them; a store or audit log that the new
        config no longer names is closed once they have.
        """
        issuers, identities = issuers_from(config), identities_from(config)
        prices, policies, plans = config.price_table(), current_policies(config), current_plans(config)
        llm_hosts = config.llm_catalogue()
        sender = sender_for(config, self.metrics.alert)
        if config.admin_port:
            admin_token(config.admin_token_env)  # a config with an admin port and no token is refused
        self.plans = plans
        if self.admin is not None:
            self.admin.api.plans = self.plans
        old_gate, old_audit = self.gate, self.audit
        same_store = old_gate is not None and self.config.store_url == config.store_url
        if same_store:
            store = old_gate.store
        else:  # its failures counted for agentkeys_store_errors_total
            ledger = ErrorCountingLedger(open_ledger(config.store_url, config.calendar), self.metrics.store_error)
            store = Store(ledger, seal=store_seal(config.path(config.certs_dir)))
        self.config = config
        self.router = Router(config, llm_hosts)
        self.gate = Gate(config, store, prices, policies, plans)
        self.control = Control(store, self.gate.auth, issuers, identities)
        self.audit = audit_log_for(config, old_audit)  # the same one while its settings are the same
        if self.alerts:
            self.alerts.close(timeout=0)  # alerts still waiting to be delivered are dropped
        self.alerts = Alerts(config.alerts, store, sender, config.calendar) if sender else None
        self._retire(None if same_store else old_gate, None if self.audit is old_audit else old_audit)
        self.metrics.watch_holds(lambda: len(self.gate.store.open_holds))
        for name, spec in config.providers.items():
            if not spec.real_key():
                log.warning(
                    "agentkeys: %s has no real key (%s is not set); its calls will be refused", name, spec.key_env
                )

    def _read_config(self) -> ProxyConfig:
        options = ctx.options
        config = load_config(Path(options.agentkeys_config) if options.agentkeys_config else None)
        overrides = {}
        if options.agentkeys_store:
            overrides["store"] = options.agentkeys_store
        if options.agentkeys_audit_log:
            overrides["audit_log"] = options.agentkeys_audit_log
        if options.agentkeys_metrics_port >= 0:
            overrides["metrics_port"] = options.agentkeys_metrics_port or None
        if not overrides:
            return config
        merged = ProxyConfig.model_validate({**config.model_dump(), **overrides})
        merged.base_dir = config.base_dir
        return merged

    def _retire(self, gate: Gate | None, audit: AuditLog | None):
        """Close a replaced store and audit log once the calls they admitted have settled."""
        if gate is None and audit is None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # configured before the proxy runs: nothing can be in flight
            retire_now(gate, audit)
            return
        self._run_in_background(loop, retire_when_settled(gate, audit, self.config.stale_hold_after))

    def running(self):
        if sys.version_info < (3, 12):
            log.warning(
                "agentkeys: running on Python %d.%d with mitmproxy 11, which lacks mitmproxy 12's fix for HTTP/2"
                " request smuggling; use Python >= 3.12 where you can",
                *sys.version_info[:2],
            )
        # Dial a provider only when a call is forwarded: a refused call never opens a connection.
        if ctx.options.connection_strategy != "lazy":
            ctx.options.update(connection_strategy="lazy")
        if self.health is None and (ctx.options.agentkeys_health_socket or self.config.metrics_port):
            self._serve_health()
        if self.config.admin_port and self.admin is None:
            self._serve_admin(self.config)
        if self._purge_task is None:
            self._purge_task = asyncio.get_running_loop().create_task(self._keep_the_books())
            # The price table and mitmproxy's own start-up objects live as long as the
            # proxy: garbage collections from now on leave them out.
            gc.freeze()

    def _serve_health(self):
        master = ctx.master
        self.health = HealthServer(
            self.metrics.registry,
            asyncio.get_running_loop(),
            loop_checks={"listeners": lambda: listeners_up(master), "ca": lambda: ca_loaded(master)},
            thread_checks={"store": lambda: store_answers(self.gate.store.ledger)},
        )
        if ctx.options.agentkeys_health_socket:  # a worker: its supervisor serves the metrics port
            self.health.start_on_socket(ctx.options.agentkeys_health_socket)
        else:
            self.health.start(self.config.listen_host, self.config.metrics_port)

    def _serve_admin(self, config: ProxyConfig):
        """The admin API on its own listener and thread, with its own handle on the store."""
        from agentkeys.admin import AdminApi, AdminServer  # FastAPI is imported only by a proxy that serves it

        token = admin_token(config.admin_token_env)
        ledger, seal = open_ledger(config.store_url, config.calendar), store_seal(config.path(config.certs_dir))
        api = AdminApi(ledger, self.plans, config.calendar, token, seal)
        self.admin = AdminServer(api)
        self.admin.start(config.admin_host or config.listen_host, config.admin_port)

    async def _keep_the_books(self):
        """Every `purge_interval`: settle holds that dead calls left behind, return finished children's
        budgets to their parents, and delete expired keys (none that expired after a key still in shadow mode,
        whose calls are forwarded); and take the budgets per policy for the metrics.
        Each pass (and the start) also learns the store's clock, which the proxy's own decisions use."""
        with contextlib.suppress(LedgerUnavailable):  # an outage at start: the first pass tries again
            await self.gate.store.sync_clock()
        while True:
            await asyncio.sleep(self.config.purge_interval)
            try:
                store = self.gate.store
                await store.sync_clock()
                await store.renew_holds()  # before any sweep, so no replica takes this one's live calls for dead
                for hold in await store.sweep_stale_holds(self.config.stale_hold_after):
                    log.warning("agentkeys: hold %s of key %s outlived its call", hold.hold_id, hold.key_id)
                    self._write_record(stale_hold_record(hold))
                keys = await asyncio.to_thread(store.ledger.list_keys)
                purged = await store.purge_expired(self.gate.purge_cutoff(keys, store.clock()))
                if purged:  # a count, never the list: a purge may be of thousands of keys
                    log.info("agentkeys: purged %d expired keys", purged)
                self.metrics.budgets.update(keys, time.time())
            except LedgerUnavailable as e:  # an outage, not a bug: no traceback
                log.error("agentkeys: keeping the books failed; will try again: %s", e)
            except Exception:
                log.exception("agentkeys: keeping the books failed; will try again")

    async def drain(self, grace_seconds: float):
        """Wait, up to `grace_seconds`, until every call in flight has finished and been settled and audited."""
        deadline = time.monotonic() + grace_seconds
        while self._calls_in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self._calls_in_flight:
            log.warning("agentkeys: %d calls still in flight after %ds; stopping", self._calls_in_flight, grace_seconds)

    async def done(self):
        if self._purge_task:
            self._purge_task.cancel()
        if self.health:
            self.health.stop()
        if self.admin:
            self.admin.stop()
        await asyncio.sleep(0)  # settlements scheduled on this turn of the loop start their tasks
        if self._background:  # let settlements in flight reach the store and the audit log
            await asyncio.wait(self._background, timeout=SETTLING_SECONDS)
        if self.audit:
            self.audit.close()
        if self.alerts:
            await asyncio.to_thread(self.alerts.close)
        if self.gate:
            self.gate.store.close()

    # ----- connections -----

    def http_connect(self, flow: http.HTTPFlow):
        credential = proxy_auth_user(flow.request.headers.get("proxy-authorization", ""))
        if credential:
            self.tunnel_credentials[flow.client_conn] = credential
        host, port = flow.request.host, flow.request.port
        refusal = self.router.tunnel_refusal(host, port)
        if refusal:
            flow.response = egress_refused(refusal)
        if refusal or not self.router.intercepts(host):
            vendor = self.router.unknown_llm_vendor(host)
            client = client_address(flow.client_conn)
            self._write_record(egress_record("CONNECT", host, port, client, refusal, vendor))

    def tls_failed_client(self, data: tls.TlsData):
        """A client that refused the proxy's certificate for a catalogued LLM host no provider covers (it does
        not trust the proxy's CA): its calls there cannot be seen, so the attempt itself is audited."""
        name = data.conn.sni or (data.context.server.address or ("",))[0]
        vendor = self.router.unknown_llm_vendor(name)
        if vendor:
            port = (data.context.server.address or ("", 443))[1]
            failed = f"TLS to {name} failed: the client does not trust the proxy's CA, so its LLM calls are not seen"
            self._write_record(egress_record("TLS", name, port, client_address(data.context.client), failed, vendor))

    def tls_clienthello(self, data: tls.ClientHelloData):
        """Intercept provider hosts only; any other TLS connection is relayed untouched.

        A tunnel opened to a provider's host is intercepted whatever name its ClientHello gives, so a
        made-up SNI cannot carry a call to the provider past the proxy.
        """
        tunnel_host = (data.context.server.address or ("",))[0]
        if isinstance(data.context.client.proxy_mode, TransparentMode):
            self._redirected_clienthello(data)
        elif not (self.router.intercepts(data.client_hello.sni or "") or self.router.intercepts(tunnel_host)):
            data.ignore_connection = True

    def _redirected_clienthello(self, data: tls.ClientHelloData):
        """TLS the kernel redirected here: only its server name says where it goes (the address is an IP)."""
        host, port = data.context.server.address or ("", 0)
        name = data.client_hello.sni or host
        if not self.router.intercepts_redirected(name):
            data.ignore_connection = True
            self._write_record(egress_record("TLS", name, port, client_address(data.context.client), None))

    def tcp_start(self, flow: tcp.TCPFlow):
        """A tunnel to a provider's host carries HTTP and nothing else: raw bytes there would pass unchecked."""
        host, port = flow.server_conn.address or ("", 0)
        if self.router.intercepts(host):
            flow.kill()
            refusal = f"a tunnel to {host} must carry HTTP(S); raw traffic to a provider is refused"
            self._write_record(egress_record("TCP", host, port, client_address(flow.client_conn), refusal))

    # ----- the call -----

    async def request(self, flow: http.HTTPFlow):
        try:
            gateway = isinstance(flow.client_conn.proxy_mode, ReverseMode)
            target = target_host(flow)
            if not gateway and host_conflict(target, flow.request.host_header):
                flow.response = host_refused(target, flow.request.host_header)
                return
            route = self.router.route(gateway, target, flow.request.path)
            match route:
                case ProviderRoute():
                    await self._gate_call(flow, route)
                case ControlRoute():
                    await self._answer_control(flow, route)
                case BadPath(provider=provider, reason=reason):
                    wire = FORMATS[self.config.providers[provider].format]
                    flow.response = json_response(*wire.error(DenyKind.BAD_REQUEST, f"agentkeys: {reason}"))
                case NoProvider(prefix=prefix):
                    flow.response = no_provider(prefix, self.router.providers)
                case NoEndpoint(provider=provider, path=path):
                    flow.response = no_endpoint(self.router.formats[provider], provider, flow.request.method, path)
                case OtherHost(host=host):
                    self._other_host(flow, host)
                case UnknownLlmHost(host=host, vendor=vendor):
                    self._unknown_llm_host(flow, host, vendor)
        except Exception:
            log.exception("agentkeys: request hook failed; refusing the call")
            if flow.metadata.get(STATE) is None:
                flow.response = http.Response.make(500, b"agentkeys: internal error\n", {"content-type": "text/plain"})

    def _other_host(self, flow: http.HTTPFlow, host: str):
        """Plain HTTP to a host that is not a provider's (a tunnel's requests never get here)."""
        refusal = self.router.egress_refusal(host)
        if refusal:
            flow.response = egress_refused(refusal)
        client = client_address(flow.client_conn)
        self._write_record(egress_record(flow.request.method, host, flow.request.port, client, refusal))

    def _unknown_llm_host(self, flow: http.HTTPFlow, host: str, vendor: str):
        """A call to a catalogued LLM API host that no provider is configured for: audited (host, path, bytes,
        client), then refused or passed on untouched per `unknown_llm_hosts` (`audit` warns in the log too)."""
        refusal = self.router.llm_host_refusal(host, vendor)
        if refusal:
            flow.response = egress_refused(refusal)
        elif self.router.unknown_llm_hosts == "audit" and host not in self._warned_llm_hosts:
            self._warned_llm_hosts.add(host)
            log.warning("agentkeys: LLM traffic to %s (%s), which no provider is configured for: passed, and"
                        " audited (unknown_llm_hosts: audit)", host, vendor)  # fmt: skip
        request = flow.request
        traffic = Traffic(host, client_address(flow.client_conn), len(request.raw_content or b""))
        path = urlsplit(request.path).path  # never its query, which may carry a key (?key=)
        setting = self.router.unknown_llm_hosts
        self._write_record(llm_host_record(request.method, path, request.port, vendor, traffic, refusal, setting))

    async def _gate_call(self, flow: http.HTTPFlow, route: ProviderRoute):
        started = time.perf_counter()
        call = call_of(flow, route.provider, route.path, route.query, self.tunnel_credentials.get(flow.client_conn))
        wire = FORMATS[self.config.providers[route.provider].format]
        state = flow.metadata[STATE] = CallState(call, wire, self.gate)
        try:
            state.observed = await observe(state.gate, call, host_called(flow))
            if state.observed:
                pass_untouched(flow.request, call, self.router.upstream(call.provider))
                state.forwarded = True
                self._calls_in_flight += 1
                return
            state.admission = await state.gate.admit(call)
            forward(flow.request, state.admission, call, self.router.upstream(call.provider))
            state.forwarded = True
            self._calls_in_flight += 1
        except Denial as denial:
            self._deny(flow, state, denial)
        except Exception:
            log.exception("agentkeys: request hook failed; refusing the call")
            key = state.admission.key if state.admission else None
            if state.admission:
                await state.gate.release(state.admission)
            failed = Denial(DenyKind.INTERNAL, "agentkeys: internal error; the call was not forwarded", key)
            self._deny(flow, state, failed)
        finally:
            state.overhead_seconds += time.perf_counter() - started

    async def _answer_control(self, flow: http.HTTPFlow, route: ControlRoute):
        call = call_of(flow, CONTROL_PROVIDER, route.path, route.query, self.tunnel_credentials.get(flow.client_conn))
        try:
            answer = await self.control.handle(call)
        except LedgerUnavailable as e:
            log.error("agentkeys: %s", e)
            status, body = FORMATS["openai"].error(DenyKind.UNAVAILABLE, "agentkeys: the key store is unavailable")
            flow.response = json_response(status, body, RETRY_HEADER[DenyKind.UNAVAILABLE])
            self._write_record(control_record(call, None, status, "the key store is unavailable", CONTROL_PROVIDER))
            return
        retry = "false" if answer.status >= 400 else None
        flow.response = json_response(answer.status, answer.body, retry)
        record = control_record(call, answer.key, answer.status, answer.reason, CONTROL_PROVIDER, answer.identity)
        self._write_record(record)

    def _deny(self, flow: http.HTTPFlow, state: CallState, denial: Denial):
        status, body = state.wire.error(denial.kind, denial.message)
        flow.response = json_response(status, body, headers=retry_headers(denial))
        if denial.key:
            flow.response.headers[REMAINING_HEADER] = usd_header(remaining_when_refused(denial))
        state.finished = True
        self.metrics.refused(state.call.provider, denial.key and denial.key.policy_name, denial.kind.value)
        revision = state.gate.policies.get(denial.key.policy_name) if denial.key else None
        self._write_record(denied_record(state.call, denial, status, revision.revision if revision else None))
        if self.alerts and denial.kind in ALERTED_REFUSALS:
            self._run_in_background(asyncio.get_running_loop(), self._alert_refusal(self.alerts, denial))

    def responseheaders(self, flow: http.HTTPFlow):
        state = in_flight(flow)
        if state is None:
            return
        try:
            admission, facts = state.admission, state.facts
            streaming = flow.response.headers.get("content-type", "").startswith("text/event-stream")
            if streaming and facts and facts.metered and flow.response.status_code < 400:
                splitter = SseSplitter(self.config.max_stream_event_bytes)
                state.relay = StreamRelay(state.wire.stream_meter(facts), splitter)
                flow.response.stream = state.relay
            if state.relay and admission:
                # A stream's headers leave before its usage is known: it gets what remains after its hold.
                replace_headers(flow.response.headers, budget_headers(admission, cost=None))
        except Exception:
            log.exception("agentkeys: responseheaders hook failed")

    async def response(self, flow: http.HTTPFlow):
        state = in_flight(flow)
        if state is None:
            return
        state.finished = True
        status = flow.response.status_code
        if status >= 400:  # an upstream that echoes the request would hand the agent the real key
            redact(flow.response, state.gate.auth.secrets_in_play(state.call))
        try:
            outcome = await self._finished_outcome(flow, state)
            if state.admission and not state.relay:
                charge = charge_for(state.admission, outcome)
                replace_headers(flow.response.headers, budget_headers(state.admission, charge.cost_micros))
        except Exception:
            log.exception("agentkeys: reading the response failed; the call is charged its full hold")
            outcome = Outcome(reached_provider=True, complete=True, status=status, meter_broken=True, note="ok")
        if state.admission:
            await self._remember_context(state, outcome)
        self._settle_in_background(flow, state, outcome)

    async def _remember_context(self, state: CallState, outcome: Outcome):
        """Before the agent has this answer, so that its next turn finds what it continues measured."""
        try:
            await state.gate.remember_context(state.admission, outcome)
        except LedgerUnavailable as e:  # an outage: a call continuing this response is held at the context window
            log.warning("agentkeys: the context of a response was not kept: %s", e)
        except Exception:
            log.exception("agentkeys: the context of a response was not kept")

    def error(self, flow: http.HTTPFlow):
        state = in_flight(flow)
        if state is None:
            return
        state.finished = True
        relay, server = state.relay, flow.server_conn
        outcome = Outcome(
            reached_provider=state.forwarded and server.timestamp_tcp_setup is not None
            and (not server.tls or server.timestamp_tls_setup is not None),
            complete=False,
            status=flow.response.status_code if flow.response else None,
            stream=relay.meter.result() if relay else None,
            meter_broken=bool(relay and relay.broken),
            note=f"error: {flow.error.msg if flow.error else 'unknown'}",
        )  # fmt: skip
        self._settle_in_background(flow, state, outcome)

    async def _finished_outcome(self, flow: http.HTTPFlow, state: CallState) -> Outcome:
        """The outcome of a response that arrived in full, with the usage its stream or its body showed."""
        status, relay = flow.response.status_code, state.relay
        if relay:
            stream = relay.meter.result()
            return Outcome(
                reached_provider=True, complete=True, status=status, stream=stream, meter_broken=relay.broken, note="ok"
            )
        read = should_read_usage(state, flow)
        usage = await self._response_usage(flow, state) if read else None
        admission = state.admission  # None for a real key's own call (real_keys: audit): nothing to remember
        stored = admission.wire.stored_response(admission.facts, flow.response.content) if read and admission else None
        return Outcome(
            reached_provider=True, complete=True, status=status, usage=usage, usage_rejected=state.usage_rejected,
            stored=stored, note="ok",
        )  # fmt: skip

    async def _response_usage(self, flow: http.HTTPFlow, state: CallState) -> Usage | None:
        """The usage of a whole response, read once; a large body (many embeddings) is parsed off the loop."""
        if not state.usage_read:
            read, content = state.wire.usage_from_response, flow.response.content
            try:
                if len(content) > LARGE_BODY_BYTES:
                    state.usage = await asyncio.get_running_loop().run_in_executor(None, read, content)
                else:
                    state.usage = read(content)
            except UsageRejected as e:
                state.usage_rejected = str(e)
            state.usage_read = True
        return state.usage

    def _settle_in_background(self, flow: http.HTTPFlow, state: CallState, outcome: Outcome):
        """Settle and record after the agent has its answer: the hold covers the call meanwhile.

        The task is made on the loop's next turn: mitmproxy 12 creates tasks eagerly, so one made
        here would write to the store and the audit log before the response is sent.
        """
        loop = asyncio.get_running_loop()
        loop.call_soon(self._run_in_background, loop, self._settle_then_record(flow, state, outcome))

    def _run_in_background(self, loop: asyncio.AbstractEventLoop, work):
        task = loop.create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _settle_then_record(self, flow: http.HTTPFlow, state: CallState, outcome: Outcome):
        if state.observed:
            self._record_real_key_call(flow, state, outcome)
            return
        started = time.perf_counter()
        admission = state.admission
        try:
            settlement = await state.gate.settle(admission, outcome)
        except Exception:  # a bug, not the store (whose failures are tried again until it takes the write)
            log.exception("agentkeys: the hold of key %s stays in the store unsettled", admission.key.key_id)
            why = f"the settlement could not be written: hold {admission.hold_id} is charged in full by a sweep"
            settlement = Settlement(0, "none", why=why)
        try:
            state.overhead_seconds += time.perf_counter() - started
            status = flow.response.status_code if flow.response else None
            record = allowed_record(state.call, admission, settlement, status, outcome.note, timings(flow, state))
            self._write_record(record)
        finally:
            self._calls_in_flight -= 1
        if self.alerts:
            try:
                await self.alerts.after_settlement(admission.key, settlement.cost_micros)
            except Exception:
                log.exception("agentkeys: working out the alerts of a call failed")

    async def _alert_refusal(self, alerts: Alerts, denial: Denial):
        try:
            await alerts.after_refusal(denial)
        except Exception:
            log.exception("agentkeys: working out the alerts of a refusal failed")

    def _record_real_key_call(self, flow: http.HTTPFlow, state: CallState, outcome: Outcome):
        try:
            status = flow.response.status_code if flow.response else None
            record = real_key_record(state.call, state.observed, outcome, status, traffic_of(flow, state.observed.host))
            self._write_record(record)
        finally:
            self._calls_in_flight -= 1

    # ----- record -----

    def _write_record(self, record: CallRecord):
        try:
            self.audit.write(record)
            self.metrics.observe(record)
            logs.log_call(record)
        except Exception:
            log.exception("agentkeys: writing the audit record failed")


async def retire_when_settled(gate: Gate | None, audit: AuditLog | None, longest_call_seconds: float):
    deadline = time.monotonic() + longest_call_seconds
    while gate and gate.store.open_holds and time.monotonic() < deadline:
        await asyncio.sleep(1)
    await asyncio.sleep(SETTLING_SECONDS)  # the last settlements' records
    retire_now(gate, audit)


def retire_now(gate: Gate | None, audit: AuditLog | None):
    if gate:
        gate.store.close()
    if audit:
        audit.close()


def in_flight(flow: http.HTTPFlow) -> CallState | None:
    """The state of a forwarded call that has not been settled (or recorded) yet, else None."""
    state = flow.metadata.get(STATE)
    if state is None or not state.forwarded or state.finished:
        return None
    return state


def should_read_usage(state: CallState, flow: http.HTTPFlow) -> bool:
    return bool(state.facts and state.facts.metered) and flow.response.status_code < 400


def call_of(flow: http.HTTPFlow, provider: str, path: str, query: str, tunnel_credential: str | None) -> CallRequest:
    return CallRequest(
        provider=provider,
        method=flow.request.method,
        path=path,
        query=query,
        headers=credential_headers(flow.request.headers),
        body=flow.request.get_content(strict=False) or b"",
        tunnel_credential=tunnel_credential,
    )


def timings(flow: http.HTTPFlow, state: CallState) -> Timings:
    request, response, relay = flow.request, flow.response, state.relay
    overhead_seconds = state.overhead_seconds + (relay.seconds_spent if relay else 0)
    upstream_latency = ttft = None
    if response and request.timestamp_end and response.timestamp_start:
        upstream_latency = round((response.timestamp_start - request.timestamp_end) * 1000, 3)
    if relay and relay.first_chunk_at and request.timestamp_end:
        ttft = round((relay.first_chunk_at - request.timestamp_end) * 1000, 3)
    return Timings(round(overhead_seconds * 1000, 3), upstream_latency, ttft)


def forward(request: http.Request, admission: Admission, call: CallRequest, upstream: Upstream) -> None:
    """Swap the agent's credentials for the real key and point the request at the provider."""
    key_name, key_value = admission.wire.real_key_header(admission.real_key)
    # Every credential header the agent sent goes; identity encoding, so streamed SSE can be read as it passes.
    added = {key_name: key_value, "accept-encoding": "identity"}
    replace_headers(request.headers, added, REPLACED_REQUEST_FIELDS, rewritten={b"host": upstream.authority})
    # Google's ?key=: the real key goes in a header
    point_at(request, call.path, without_query_credentials(call.query), upstream)
    if admission.upstream_body is not None:
        request.content = admission.upstream_body


def pass_untouched(request: http.Request, call: CallRequest, upstream: Upstream) -> None:
    """A real key's call (real_keys: audit) to the provider, its credentials, body and query as sent; only
    its encoding is asked as identity, so that a stream's usage can be read as it passes."""
    replace_headers(request.headers, {"accept-encoding": "identity"}, rewritten={b"host": upstream.authority})
    point_at(request, call.path, call.query, upstream)


def point_at(request: http.Request, path: str, query: str, upstream: Upstream) -> None:
    """Send the request to the provider's upstream, at `path` (in the provider's terms) with `query`; the
    Host header is the caller's to rewrite, in its own pass over the headers."""
    # Set directly: mitmproxy's `host` setter would encode the name again and look for Host once more.
    request.scheme = upstream.scheme
    request.data.host, request.data.port = upstream.host, upstream.port
    if request.data.authority:
        request.data.authority = upstream.authority
    request.path = upstream.base_path + path + (f"?{query}" if query else "")


def traffic_of(flow: http.HTTPFlow, host: str) -> Traffic:
    """A call passed on untouched, sent to `host`: from whom, and its size each way (a streamed answer's
    is not kept, so not known)."""
    response_bytes = len(flow.response.raw_content or b"") if flow.response and not flow.response.stream else None
    return Traffic(host, client_address(flow.client_conn), len(flow.request.raw_content or b""), response_bytes)


def answer_proxy_errors_as_json() -> None:
    """Make mitmproxy's own error answers (an upstream it could not reach, a malformed request) JSON in
    the shape the providers' SDKs read, rather than an HTML page that names the upstream's address.

    mitmproxy writes these answers itself, after every hook has run, so its page writers are
    replaced: the HTTP/1 one whole (with `x-should-retry` for a gateway error), the HTTP/2 one's body.
    """
    _http1.make_error_response = http1_error_response
    _http2.format_error = proxy_error_body


def proxy_error_body(status: int, message: str) -> bytes:
    if status >= 500:  # the upstream's failure: its message names internal addresses
        message = "the provider could not be reached or did not answer; try again shortly"
    error = {"message": f"agentkeys: {message}", "type": "api_error", "code": f"proxy_{status}"}
    return json.dumps({"type": "error", "error": error}).encode()


def http1_error_response(status: int, message: str = "") -> bytes:
    headers = {"content-type": "application/json", "connection": "close"}
    if status in (502, 503, 504):
        headers["x-should-retry"] = "true"
    return assemble_response(http.Response.make(status, proxy_error_body(status, message), headers))


def json_response(
    status: int, body: dict, should_retry: str | None = None, headers: dict[str, str] | None = None
) -> http.Response:
    """An answer of the proxy's own; `should_retry` tells the official SDKs whether to try again."""
    headers = {"content-type": "application/json", **(headers or {})}
    if should_retry:
        headers["x-should-retry"] = should_retry
    return http.Response.make(status, dumps(body).encode(), headers)


def retry_headers(denial: Denial) -> dict[str, str]:
    """A rate limit's `retry-after` (seconds, and milliseconds as the SDKs also read) with `x-should-retry:
    true`; any other refusal's `x-should-retry` as RETRY_HEADER says."""
    if denial.retry_after is not None:
        wait = max(denial.retry_after, 0.001)
        return {"retry-after": str(math.ceil(wait)), "retry-after-ms": str(math.ceil(wait * 1000)),
                "x-should-retry": "true"}  # fmt: skip
    should_retry = RETRY_HEADER.get(denial.kind)
    return {"x-should-retry": should_retry} if should_retry else {}


def no_provider(prefix: str, providers: tuple[str, ...]) -> http.Response:
    status, body = FORMATS["openai"].error(
        DenyKind.NOT_FOUND,
        f"agentkeys: no provider at /{prefix}; use one of " + ", ".join(f"/{name}" for name in providers),
    )
    return json_response(status, body)


def no_endpoint(wire: WireFormat, provider: str, method: str, path: str) -> http.Response:
    status, body = wire.error(DenyKind.NOT_FOUND, f"agentkeys: {provider} has no endpoint {method} {path}")
    return json_response(status, body)


def target_host(flow: http.HTTPFlow) -> str:
    """The host a request is sent to: the tunnel's or the URL's; on the transparent listener, where the
    kernel's redirect left only an address, the name the agent dialled: its TLS server name, or (plain
    HTTP) its Host header."""
    if not isinstance(flow.client_conn.proxy_mode, TransparentMode):
        return flow.request.host
    return flow.client_conn.sni or urlsplit(f"//{flow.request.host_header or ''}").hostname or flow.request.host


def host_called(flow: http.HTTPFlow) -> str:
    """The host the client addressed: in proxy (and transparent) mode the target, on the gateway (whose
    requests all name one placeholder upstream) the name in its Host header."""
    if isinstance(flow.client_conn.proxy_mode, ReverseMode):
        return urlsplit(f"//{flow.request.host_header or ''}").hostname or flow.request.host
    return target_host(flow)


def egress_refused(reason: str) -> http.Response:
    return http.Response.make(403, f"agentkeys: {reason}\n", {"content-type": "text/plain"})


def host_refused(target: str, host_header: str) -> http.Response:
    message = f"agentkeys: the request is sent to {target} but its Host header names {host_header}"
    return http.Response.make(400, message.encode() + b"\n", {"content-type": "text/plain"})


def client_address(client: connection.Client) -> str:
    host, port, *_ = client.peername or ("", 0)
    return f"{host}:{port}"


def credential_headers(headers: http.Headers) -> dict[str, str]:
    """The credential headers a request carries, by lower-cased name, read in one pass over its raw
    fields (mitmproxy's `headers.get` scans them all for each name); a repeated one is folded as `get` would."""
    found: dict[str, str] = {}
    for raw_name, raw_value in headers.fields:
        raw_name = raw_name.lower()
        if raw_name in CREDENTIAL_FIELDS and raw_value:
            name, value = raw_name.decode(), raw_value.decode("utf-8", "surrogateescape")
            found[name] = f"{found[name]}, {value}" if name in found else value
    return found


def replace_headers(
    headers: http.Headers,
    added: dict[str, str],
    dropped: frozenset[bytes] = frozenset(),
    rewritten: dict[bytes, bytes] | None = None,
) -> None:
    """Remove the headers named in `dropped` or `added`, give those named in `rewritten` (lower-case) a new
    value where they are present, then append `added`: one pass over the raw fields."""
    new_fields = tuple((name.encode(), value.encode("utf-8", "surrogateescape")) for name, value in added.items())
    gone = dropped.union(name for name, _ in new_fields)
    rewritten = rewritten or {}
    kept = tuple(
        (name, rewritten.get(lowered, value)) for name, value in headers.fields if (lowered := name.lower()) not in gone
    )
    headers.fields = kept + new_fields


def redact(response: http.Response, secrets: list[str]) -> None:
    """Replace every secret in the response's headers and body."""
    raw_secrets = [secret.encode("utf-8", "surrogateescape") for secret in secrets if len(secret) >= 8]
    content = response.get_content(strict=False) or b""
    fields = response.headers.fields
    for secret in raw_secrets:
        content = content.replace(secret, REDACTED)
        fields = tuple((name, value.replace(secret, REDACTED)) for name, value in fields)
    response.headers.fields = fields
    response.set_content(content)


def budget_headers(admission: Admission, cost: int | None) -> dict[str, str]:
    """What the agent is told of its budget: this call's cost (None while a stream's is unknown; never
    for an unmetered call, whose cost is the provider's secret), what its key has left, any clamp."""
    headers = {}
    if cost is None:
        headers[REMAINING_HEADER] = usd_header(admission.remaining_micros)
    else:
        if not admission.unmetered:
            headers[COST_HEADER] = usd_header(cost)
        headers[REMAINING_HEADER] = usd_header(admission.remaining_micros + admission.hold_micros - cost)
    if admission.clamped_to:
        headers[CLAMPED_HEADER] = str(admission.clamped_to)
    return headers


def remaining_when_refused(denial: Denial) -> int:
    """What a refused call's key has left: nothing once it can no longer spend (revoked, expired)."""
    if denial.remaining_micros is not None:
        return max(0, denial.remaining_micros)
    if denial.key.status(time.time()) != "active":
        return 0
    return max(0, denial.key.remaining_micros)


def usd_header(micros: int) -> str:
    """Micro-dollars as a plain USD amount with every digit: `0.000123`."""
    return f"{micros_to_usd(micros):.6f}"


addons = [LogGuard(), ConnectionGuard(), AgentKeys()]
