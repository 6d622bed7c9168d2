"""The mitmproxy addon: a thin adapter from flows to the gate.

Two listeners feed it. In proxy mode (HTTPS_PROXY) a provider is recognised by its host and only
provider hosts are intercepted; everything else is an untouched TLS tunnel (or refused, with
`egress: allowlist`). In gateway mode (a reverse-proxy listener) the first path segment names the
provider: `/openai/v1/...`, `/anthropic/v1/...`.

Every hook catches its own errors: mitmproxy logs a raising hook and lets the flow continue,
which here would mean forwarding unchecked. A failure before forwarding answers with an error;
a failure after it charges the full hold.

Loads as `agentkeys serve` or as a plain script: `mitmdump -s .../agentkeys/addon.py
--set agentkeys_config=agentkeys.yaml`.
"""

import asyncio
import gc
import json
import logging
import sys
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from mitmproxy import ctx, exceptions, http, tls
from mitmproxy.proxy.mode_specs import ReverseMode

from agentkeys import tokens
from agentkeys.audit import AuditLog, CallRecord
from agentkeys.control import Control, ControlAnswer, is_control_path, issuers_from
from agentkeys.credentials import CREDENTIAL_HEADERS, proxy_auth_user, without_query_credentials
from agentkeys.gate import LARGE_BODY_BYTES, Admission, CallRequest, Denial, Gate, Settlement
from agentkeys.keys import iso
from agentkeys.ledger import KeyRecord, LedgerUnavailable, StaleHold, open_ledger
from agentkeys.metrics import Metrics
from agentkeys.money import micros_to_usd
from agentkeys.policy import ProxyConfig, load_config
from agentkeys.pricing import Usage
from agentkeys.providers import FORMATS
from agentkeys.providers.base import DenyKind, SseSplitter, StreamMeter, WireFormat
from agentkeys.yamlfile import ConfigError

log = logging.getLogger(__name__)

STATE = "agentkeys"
CONTROL_HOST = "agentkeys.local"  # the proxy's own API through proxy mode: http://agentkeys.local/_agentkeys/v1/...
CONTROL_PROVIDER = "agentkeys"  # how control calls appear in the audit log
RETRY_HEADER = {DenyKind.BUDGET: "false", DenyKind.UNAVAILABLE: "true"}
# Told to the agent on every forwarded call, in USD: what this call cost, what its key has left.
COST_HEADER = "x-agentkeys-cost"
REMAINING_HEADER = "x-agentkeys-budget-remaining"
CLAMPED_HEADER = "x-agentkeys-max-tokens-clamped"
CREDENTIAL_FIELDS = frozenset(name.encode() for name in CREDENTIAL_HEADERS)
# Replaced on every forwarded request: the agent's credentials, and its accept-encoding (see `_forward`).
REPLACED_REQUEST_FIELDS = CREDENTIAL_FIELDS | {b"accept-encoding"}


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
            return [event.raw for event in self.splitter.feed(chunk) if self.meter.feed(event)]
        except Exception:
            # Never cut the agent's stream over our own bug; the call is then charged its full hold.
            log.exception("agentkeys: stream metering failed; passing the rest through")
            self.broken = True
            return non_empty(self.splitter.flush(), chunk)
        finally:
            self.seconds_spent += time.perf_counter() - started


def non_empty(*chunks: bytes) -> list[bytes]:
    return [chunk for chunk in chunks if chunk]


@dataclass(frozen=True)
class Upstream:
    """A provider's base URL, split once at configure time."""

    scheme: str
    host: str
    port: int
    base_path: str
    authority: bytes  # host[:port], as the Host header (and HTTP/2's :authority) names it

    @classmethod
    def parse(cls, base_url: str) -> "Upstream":
        parts = urlsplit(base_url)
        default_port = 443 if parts.scheme == "https" else 80
        port = parts.port or default_port
        name = parts.hostname.encode("idna")
        if b":" in name:  # an IPv6 address
            name = b"[" + name + b"]"
        authority = name if port == default_port else b"%s:%d" % (name, port)
        return cls(parts.scheme, parts.hostname, port, parts.path.rstrip("/"), authority)


@dataclass
class CallState:
    """What one flow carries between hooks, in `flow.metadata[STATE]`."""

    call: CallRequest
    wire: WireFormat
    admission: Admission | None = None
    relay: StreamRelay | None = None
    usage: Usage | None = None  # of a whole (not streamed) response, read once for its headers and settlement
    usage_read: bool = False
    overhead_seconds: float = 0.0
    finished: bool = False


class AgentKeys:
    def __init__(self):
        self.config: ProxyConfig | None = None
        self.gate: Gate | None = None
        self.audit: AuditLog | None = None
        self.metrics = Metrics()
        self.provider_by_host: dict[str, str] = {}
        self.tunnel_credentials: dict[str, str] = {}
        self._metrics_started = False
        self._purge_task: asyncio.Task | None = None
        self._settling: set[asyncio.Task] = set()

    # ----- set-up -----

    def load(self, loader):
        loader.add_option("agentkeys_config", str, "", "Agent Keys proxy config file (YAML).")
        loader.add_option("agentkeys_store", str, "", "Agent Keys store URL; overrides the config's `store`.")
        loader.add_option("agentkeys_audit_log", str, "", "Audit log path; overrides the config's `audit_log`.")
        loader.add_option(
            "agentkeys_metrics_port", int, -1, "Prometheus port; overrides the config's (0 turns metrics off)."
        )

    def configure(self, updated: set[str]):
        if not any(name.startswith("agentkeys_") for name in updated):
            return
        try:
            config = self._read_config()
            issuers = issuers_from(config)
            prices = config.price_table()
        except ConfigError as e:
            raise exceptions.OptionsError(f"agentkeys: bad config:\n{e}") from None
        ledger = open_ledger(config.store_url)
        if self.audit:
            self.audit.close()
        self.config = config
        self.gate = Gate(config, ledger, prices)
        self.control = Control(self.gate, issuers)
        self.audit = AuditLog(config.path(config.audit_log) if config.audit_log else None)
        self.provider_by_host = {host: name for name, spec in config.providers.items() for host in spec.hosts}
        self.upstreams = {name: Upstream.parse(spec.upstream) for name, spec in config.providers.items()}
        tokens.preload()  # half a second, once, rather than on the event loop during the first call
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
        if self.config.metrics_port and not self._metrics_started:
            self.metrics.serve(self.config.metrics_port, self.config.listen_host)
            self._metrics_started = True
        if self._purge_task is None:
            self._purge_task = asyncio.get_running_loop().create_task(self._keep_the_books())
            # The price table, the tokenizers and mitmproxy's own start-up objects live as long as the
            # proxy: every garbage collection from now on leaves them out (about 0.04 ms less per call).
            gc.freeze()

    async def _keep_the_books(self):
        """Every `purge_interval`: settle holds that dead calls left behind, return finished children's
        budgets to their parents, and delete expired keys."""
        while True:
            await asyncio.sleep(self.config.purge_interval)
            try:
                for hold in await self.gate.sweep_stale_holds():
                    log.warning("agentkeys: hold %d of key %s outlived its call", hold.hold_id, hold.key_id)
                    self._write_record(stale_hold_record(hold))
                purged = await self.gate.purge_expired()
                if purged:
                    log.info("agentkeys: purged %d expired keys: %s", len(purged), ", ".join(purged))
            except Exception:
                log.exception("agentkeys: keeping the books failed; will try again")

    async def done(self):
        if self._purge_task:
            self._purge_task.cancel()
        await asyncio.sleep(0)  # settlements scheduled on this turn of the loop start their tasks
        if self._settling:  # let settlements in flight reach the store and the audit log
            await asyncio.wait(self._settling, timeout=5)
        if self.audit:
            self.audit.close()

    # ----- connections -----

    def http_connect(self, flow: http.HTTPFlow):
        """Remember the key given as the HTTPS_PROXY user, for every flow in this tunnel."""
        credential = proxy_auth_user(flow.request.headers.get("proxy-authorization", ""))
        if credential:
            self.tunnel_credentials[flow.client_conn.id] = credential
        if self.config.egress == "allowlist" and flow.request.host not in self.provider_by_host:
            flow.response = egress_refused(flow.request.host)

    def tls_clienthello(self, data: tls.ClientHelloData):
        """Intercept provider hosts only; any other TLS connection is relayed untouched."""
        host = data.client_hello.sni or (data.context.server.address or ("",))[0]
        if host not in self.provider_by_host:
            data.ignore_connection = True

    def client_disconnected(self, client):
        self.tunnel_credentials.pop(client.id, None)

    # ----- the call -----

    async def request(self, flow: http.HTTPFlow):
        started = time.perf_counter()
        state = None
        try:
            if self._is_control(flow):
                await self._answer_control(flow)
                return
            state = self._route(flow)
            if state is None:
                return
            flow.metadata[STATE] = state
            outcome = await self.gate.admit(state.call)
            if isinstance(outcome, Denial):
                self._deny(flow, state, outcome)
                return
            state.admission = outcome
            self._forward(flow, state)
        except Exception:
            log.exception("agentkeys: request hook failed; refusing the call")
            await self._fail_closed(flow, state)
        finally:
            if state:
                state.overhead_seconds += time.perf_counter() - started

    def _route(self, flow: http.HTTPFlow) -> CallState | None:
        """Which provider this is and the path in its own terms; None for traffic we leave alone."""
        split = urlsplit(flow.request.path)
        if isinstance(flow.client_conn.proxy_mode, ReverseMode):
            prefix, _, rest = split.path.lstrip("/").partition("/")
            provider, path = prefix, "/" + rest
            if provider not in self.config.providers:
                wire = FORMATS["openai"]
                status, body = wire.error(
                    DenyKind.FORBIDDEN,
                    f"agentkeys: no provider at /{prefix}; use one of "
                    + ", ".join(f"/{name}" for name in self.config.providers),
                )
                flow.response = json_response(404, body)
                return None
        else:
            provider, path = self.provider_by_host.get(flow.request.pretty_host), split.path
            if provider is None:
                self._non_provider(flow)
                return None
            # A host whose API lives under a path (Groq's /openai/v1): that path is the upstream URL's.
            base_path = self.upstreams[provider].base_path
            if base_path and path.startswith(base_path + "/"):
                path = path.removeprefix(base_path)
        call = self._call_of(flow, provider, path, split.query)
        return CallState(call=call, wire=FORMATS[self.config.providers[provider].format])

    def _call_of(self, flow: http.HTTPFlow, provider: str, path: str, query: str = "") -> CallRequest:
        return CallRequest(
            provider=provider,
            method=flow.request.method,
            path=path,
            query=query,
            headers=credential_headers(flow.request.headers),
            body=flow.request.get_content(strict=False) or b"",
            tunnel_credential=self.tunnel_credentials.get(flow.client_conn.id),
        )

    def _is_control(self, flow: http.HTTPFlow) -> bool:
        """The proxy's own API: on the gateway, or through the proxy at a provider host or `agentkeys.local`."""
        if not is_control_path(flow.request.path):
            return False
        if isinstance(flow.client_conn.proxy_mode, ReverseMode):
            return True
        host = flow.request.pretty_host
        return host in self.provider_by_host or host == CONTROL_HOST

    async def _answer_control(self, flow: http.HTTPFlow):
        call = self._call_of(flow, CONTROL_PROVIDER, urlsplit(flow.request.path).path)
        try:
            answer = await self.control.handle(call)
        except LedgerUnavailable as e:
            log.error("agentkeys: %s", e)
            answer = ControlAnswer(503, {"error": {"message": "agentkeys: the key store is unavailable"}}, str(e))
        retry = RETRY_HEADER[DenyKind.UNAVAILABLE] if answer.status == 503 else None
        flow.response = json_response(answer.status, answer.body, retry)
        self._write_record(
            record_of(
                answer.key, provider=CONTROL_PROVIDER, method=call.method, path=call.path, model=None,
                decision="allow" if answer.status < 400 else "deny", reason=answer.reason, status=answer.status,
                metering="free",
            )
        )  # fmt: skip

    def _non_provider(self, flow: http.HTTPFlow):
        if self.config.egress == "allowlist":
            flow.response = egress_refused(flow.request.pretty_host)

    def _forward(self, flow: http.HTTPFlow, state: CallState):
        """Swap the agent's credentials for the real key and point the request at the provider."""
        admission, call, request = state.admission, state.call, flow.request
        key_name, key_value = admission.wire.real_key_header(admission.real_key)
        upstream = self.upstreams[call.provider]
        # Every credential header the agent sent goes; identity encoding, so streamed SSE can be read as it passes.
        added = {key_name: key_value, "accept-encoding": "identity"}
        replace_headers(request.headers, added, REPLACED_REQUEST_FIELDS, rewritten={b"host": upstream.authority})
        # Set directly: mitmproxy's `host` setter would encode the name again and look for Host once more.
        request.scheme = upstream.scheme
        request.data.host, request.data.port = upstream.host, upstream.port
        if request.data.authority:
            request.data.authority = upstream.authority
        query = without_query_credentials(call.query)  # Google's ?key=: the real key goes in a header
        request.path = upstream.base_path + call.path + (f"?{query}" if query else "")
        if admission.upstream_body is not None:
            request.content = admission.upstream_body

    def _deny(self, flow: http.HTTPFlow, state: CallState, denial: Denial):
        status, body = state.wire.error(denial.kind, denial.message)
        flow.response = json_response(status, body, RETRY_HEADER.get(denial.kind))
        state.finished = True
        self._write_record(
            record_of(
                denial.key, key_id=denial.presented_key_id, provider=state.call.provider,
                method=state.call.method, path=state.call.path, model=denial.model,
                decision="deny", reason=denial.message, status=status,
            )
        )  # fmt: skip

    async def _fail_closed(self, flow: http.HTTPFlow, state: CallState | None):
        if state is None:
            flow.response = http.Response.make(500, b"agentkeys: internal error\n", {"content-type": "text/plain"})
            return
        if state.admission:
            await self.gate.release(state.admission)
        self._deny(flow, state, Denial(DenyKind.INTERNAL, "agentkeys: internal error; the call was not forwarded"))

    def responseheaders(self, flow: http.HTTPFlow):
        state = self._in_flight(flow)
        if state is None:
            return
        try:
            admission = state.admission
            streaming = flow.response.headers.get("content-type", "").startswith("text/event-stream")
            if streaming and admission.facts.metered and flow.response.status_code < 400:
                state.relay = StreamRelay(admission.wire.stream_meter(admission.facts))
                flow.response.stream = state.relay
                # A stream's headers leave before its usage is known: it gets what remains after its hold.
                replace_headers(flow.response.headers, budget_headers(admission, cost=None))
        except Exception:
            log.exception("agentkeys: responseheaders hook failed")

    async def response(self, flow: http.HTTPFlow):
        state = self._in_flight(flow)
        if state is None:
            return
        state.finished = True
        if not state.relay:
            await self._add_cost_headers(flow, state)
        self._settle_in_background(self._settle_response(flow, state), flow, state, reason="ok")

    async def _add_cost_headers(self, flow: http.HTTPFlow, state: CallState):
        """This call's cost and what its key has left, worked out before the settlement is written.

        Both come from the response's usage at once, so the agent need not wait for the ledger: the
        settlement then charges exactly this cost.
        """
        admission = state.admission
        try:
            cost = 0
            if admission.facts.metered and flow.response.status_code < 400:
                cost = self.gate.charge(admission, await self._response_usage(flow, state))
            replace_headers(flow.response.headers, budget_headers(admission, cost))
        except Exception:
            log.exception("agentkeys: working out the cost headers failed; the settlement reads the usage itself")

    async def _settle_response(self, flow: http.HTTPFlow, state: CallState) -> Settlement:
        admission = state.admission
        if not admission.facts.metered:
            return Settlement(0, "unmetered" if admission.unmetered else "free")
        if flow.response.status_code >= 400:
            return await self.gate.release(admission)
        if state.relay:
            if state.relay.broken:
                return await self.gate.settle_usage(admission, None)
            return await self.gate.settle_stream(admission, state.relay.meter.result())
        return await self.gate.settle_usage(admission, await self._response_usage(flow, state))

    async def _response_usage(self, flow: http.HTTPFlow, state: CallState) -> Usage | None:
        """The usage of a whole response, read once; a large body (many embeddings) is parsed off the loop."""
        if not state.usage_read:
            read, content = state.admission.wire.usage_from_response, flow.response.content
            if len(content) > LARGE_BODY_BYTES:
                state.usage = await asyncio.get_running_loop().run_in_executor(None, read, content)
            else:
                state.usage = read(content)
            state.usage_read = True
        return state.usage

    def error(self, flow: http.HTTPFlow):
        state = self._in_flight(flow)
        if state is None:
            return
        state.finished = True
        reason = f"error: {flow.error.msg if flow.error else 'unknown'}"
        self._settle_in_background(self._settle_broken(flow, state), flow, state, reason)

    async def _settle_broken(self, flow: http.HTTPFlow, state: CallState) -> Settlement:
        """A call that broke off, settled as the provider would bill it.

        A stream cut short: what was streamed (an estimate). An agent that gave up waiting after its
        call reached the provider: the full hold, since the provider finishes and bills the call anyway.
        A provider that could not be reached, or failed before answering: nothing.
        """
        relay = state.relay
        if relay and relay.first_chunk_at is not None and not relay.broken:
            return await self.gate.settle_stream(state.admission, relay.meter.result())
        agent_gave_up = flow.error is not None and flow.error.msg.lower().startswith("client disconnected")
        if relay or (agent_gave_up and flow.server_conn.timestamp_tcp_setup is not None):
            return await self.gate.settle_usage(state.admission, None)
        return await self.gate.release(state.admission)

    def _settle_in_background(self, settling: Coroutine, flow: http.HTTPFlow, state: CallState, reason: str):
        """Settle and record after the agent has its answer: the hold covers the call meanwhile.

        The task is made on the loop's next turn: mitmproxy 12 creates tasks eagerly, so one made
        here would write to the store and the audit log before the response is sent.
        """
        asyncio.get_running_loop().call_soon(self._start_settling, settling, flow, state, reason)

    def _start_settling(self, settling: Coroutine, flow: http.HTTPFlow, state: CallState, reason: str):
        task = asyncio.get_running_loop().create_task(self._settle_then_record(settling, flow, state, reason))
        self._settling.add(task)
        task.add_done_callback(self._settling.discard)

    async def _settle_then_record(self, settling: Coroutine, flow: http.HTTPFlow, state: CallState, reason: str):
        started = time.perf_counter()
        try:
            settlement = await settling
        except Exception:
            log.exception("agentkeys: settling failed; charging the full hold")
            try:
                settlement = await self.gate.settle_usage(state.admission, None)
            except Exception:
                log.exception("agentkeys: the hold of key %s stays in the store unsettled", state.admission.key.key_id)
                settlement = Settlement(state.admission.hold_micros, "held")
        state.overhead_seconds += time.perf_counter() - started
        self._record_allowed(flow, state, settlement, reason)

    def _in_flight(self, flow: http.HTTPFlow) -> CallState | None:
        state = flow.metadata.get(STATE)
        if state is None or state.admission is None or state.finished:
            return None
        return state

    # ----- record -----

    def _record_allowed(self, flow: http.HTTPFlow, state: CallState, settlement: Settlement, reason: str):
        admission, usage = state.admission, settlement.usage
        request, response = flow.request, flow.response
        overhead_seconds = state.overhead_seconds + (state.relay.seconds_spent if state.relay else 0)
        record = record_of(
            admission.key, provider=state.call.provider, method=state.call.method, path=state.call.path,
            model=admission.facts.model, decision="allow", reason=reason + clamp_note(admission),
            status=response.status_code if response else None, metering=settlement.metering,
            cost_micros=settlement.cost_micros, cost_usd=micros_to_usd(settlement.cost_micros),
            hold_micros=admission.hold_micros,
            proxy_overhead_ms=round(overhead_seconds * 1000, 3),
        )  # fmt: skip
        if usage:
            record.input_tokens, record.output_tokens = usage.input_tokens, usage.output_tokens
            record.cached_tokens, record.cache_write_tokens = usage.cached_tokens, usage.cache_write_tokens
            record.reasoning_tokens = usage.reasoning_tokens
        if response and request.timestamp_end and response.timestamp_start:
            record.upstream_latency_ms = round((response.timestamp_start - request.timestamp_end) * 1000, 3)
        if state.relay and state.relay.first_chunk_at and request.timestamp_end:
            record.ttft_ms = round((state.relay.first_chunk_at - request.timestamp_end) * 1000, 3)
        self._write_record(record)

    def _write_record(self, record: CallRecord):
        try:
            self.audit.write(record)
            self.metrics.observe(record)
        except Exception:
            log.exception("agentkeys: writing the audit record failed")


def record_of(key: KeyRecord | None, key_id: str | None = None, **fields) -> CallRecord:
    """An audit record naming the key it was made with (or just the id presented, for an unknown key)."""
    if key is None:
        return CallRecord(key_id=key_id, key_name=None, policy=None, **fields)
    return CallRecord(key_id=key.key_id, key_name=key.name, policy=key.policy_name, **fields)


def stale_hold_record(hold: StaleHold) -> CallRecord:
    return CallRecord(
        key_id=hold.key_id, key_name=None, policy=None, provider=None, method="", path="", model=None,
        decision="allow", metering="held", cost_micros=hold.amount_micros, cost_usd=micros_to_usd(hold.amount_micros),
        hold_micros=hold.amount_micros,
        reason=f"settled at its full hold: the proxy that made this call (hold {hold.hold_id}, taken at"
        f" {iso(hold.created_at)}) stopped before settling it, and the provider may have billed it",
    )  # fmt: skip


def json_response(status: int, body: dict, should_retry: str | None = None) -> http.Response:
    """An answer of the proxy's own; `should_retry` tells the official SDKs whether to try again."""
    headers = {"content-type": "application/json"}
    if should_retry:
        headers["x-should-retry"] = should_retry
    return http.Response.make(status, json.dumps(body).encode(), headers)


def egress_refused(host: str) -> http.Response:
    return http.Response.make(403, f"agentkeys: egress to {host} is not allowed\n", {"content-type": "text/plain"})


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


def usd_header(micros: int) -> str:
    """Micro-dollars as a plain USD amount with every digit: `0.000123`."""
    return f"{micros_to_usd(micros):.6f}"


def clamp_note(admission: Admission) -> str:
    if not admission.clamped_to:
        return ""
    return f"; output limit lowered to {admission.clamped_to} tokens to fit the budget"


addons = [AgentKeys()]
