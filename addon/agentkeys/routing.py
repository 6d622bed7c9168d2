"""Where a request goes: listener mode + host + path → a route (no mitmproxy here).

In proxy mode (HTTPS_PROXY), and in transparent mode (connections the kernel redirected to the
proxy: `transparent_port`), a provider is recognised by its host and only provider hosts are
intercepted; everything else is an untouched TLS tunnel (or refused, with `egress: allowlist`). In
gateway mode (a reverse-proxy listener) the first path segment names the provider:
`/openai/v1/...`, `/anthropic/v1/...`. The proxy's own API (`/_agentkeys/...`) is answered on the
gateway, and through the proxy at a provider host or at `agentkeys.local`.
"""

from dataclasses import dataclass
from urllib.parse import urlsplit

from agentkeys.llmhosts import Catalogue
from agentkeys.paths import UnsafePath, normalise_path
from agentkeys.policy import ProxyConfig
from agentkeys.providers import FORMATS

CONTROL_PREFIX = "/_agentkeys/"
CONTROL_HOST = "agentkeys.local"  # the proxy's own API through proxy mode: http://agentkeys.local/_agentkeys/v1/...


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


@dataclass(frozen=True)
class ProviderRoute:
    """A call for a provider, with the path (and query) in the provider's own terms."""

    provider: str
    path: str
    query: str


@dataclass(frozen=True)
class BadPath:
    """A call for a provider whose path has no single meaning (see paths.normalise_path): refused, 400."""

    provider: str
    reason: str


@dataclass(frozen=True)
class ControlRoute:
    """The proxy's own API."""

    path: str
    query: str


@dataclass(frozen=True)
class NoProvider:
    """A gateway path whose first segment names no configured provider."""

    prefix: str


@dataclass(frozen=True)
class NoEndpoint:
    """A gateway path with no API version that names no endpoint of its provider either."""

    provider: str
    path: str


@dataclass(frozen=True)
class OtherHost:
    """Proxy-mode traffic to a host that is not a provider's: passed on or refused per `egress`."""

    host: str


@dataclass(frozen=True)
class UnknownLlmHost:
    """Proxy-mode traffic to an LLM API host of the catalogue that no provider is configured for."""

    host: str
    vendor: str


Route = ProviderRoute | BadPath | ControlRoute | NoProvider | NoEndpoint | OtherHost | UnknownLlmHost
VERSIONED = ("/v1/", "/v1beta/", "/v1alpha/", "/openai/")  # API paths as providers (and Azure) write them


class Router:
    def __init__(self, config: ProxyConfig, llm_hosts: Catalogue | None = None):
        self.providers = tuple(config.providers)
        self.llm_hosts = llm_hosts or config.llm_catalogue()
        self.unknown_llm_hosts = config.unknown_llm_hosts
        self.provider_by_host = {host: name for name, spec in config.providers.items() for host in spec.hosts}
        self.upstreams = {name: Upstream.parse(spec.upstream) for name, spec in config.providers.items()}
        self.allowlist = config.egress == "allowlist"
        self.formats = {name: FORMATS[spec.format] for name, spec in config.providers.items()}
        self.provider_ports = {
            host: {443} | {upstream.port for upstream in self.upstreams.values() if upstream.host == host}
            for host in self.provider_by_host
        }

    def route(self, gateway: bool, host: str, target: str) -> Route:
        """The route of a request that arrived on the gateway (`gateway`) or the proxy listener."""
        split = urlsplit(target)
        if split.path.startswith(CONTROL_PREFIX) and (gateway or self.answers_control_at(host)):
            return ControlRoute(split.path, split.query)
        if gateway:
            prefix, _, rest = split.path.lstrip("/").partition("/")
            if prefix not in self.upstreams:
                return NoProvider(prefix)
            try:  # the path is matched and forwarded in its normal form only (see paths.py)
                return self.gateway_route(prefix, normalise_path("/" + rest), split.query)
            except UnsafePath as e:
                return BadPath(prefix, str(e))
        provider = self.provider_by_host.get(host)
        if provider is None:
            vendor = self.unknown_llm_vendor(host)
            return UnknownLlmHost(host, vendor) if vendor else OtherHost(host)
        return provider_route(provider, split.path, split.query, self.upstreams[provider].base_path)

    def tunnel_refusal(self, host: str, port: int) -> str | None:
        """Why a CONNECT to host:port is refused, or None. A provider's host is reached only on its own
        port (443, or its configured upstream's), where the proxy intercepts it; any other host only
        when `egress` lets traffic pass."""
        if host in self.provider_by_host:
            ports = self.provider_ports[host]
            if port not in ports:
                allowed = ", ".join(str(p) for p in sorted(ports))
                return f"{host} is a provider's host, reached through this proxy on port {allowed} only"
            return None
        return self.egress_refusal(host)

    def gateway_route(self, provider: str, path: str, query: str) -> ProviderRoute | NoEndpoint:
        """SDKs disagree on whether a base URL includes the API version: the Anthropic SDK wants
        `…/anthropic` and sends `/v1/messages`, the AI SDK reads the same variable and sends
        `/messages`. A path without a version is taken as `/v1` when that names an endpoint."""
        if path.startswith(VERSIONED) or path in ("/", "/v1"):
            return ProviderRoute(provider, path, query)
        versioned = "/v1" + path
        if any(self.formats[provider].endpoint_kind(method, versioned) for method in ("GET", "POST", "DELETE")):
            return ProviderRoute(provider, versioned, query)
        return NoEndpoint(provider, path)

    def answers_control_at(self, host: str) -> bool:
        return host in self.provider_by_host or host == CONTROL_HOST

    def intercepts(self, host: str) -> bool:
        """Whether TLS to `host` is opened up here (a provider's, or a catalogued LLM API host's, whose calls
        are audited) or relayed untouched."""
        return host in self.provider_by_host or self.llm_hosts.vendor_of(host) is not None

    def unknown_llm_vendor(self, host: str) -> str | None:
        """The vendor of a catalogued LLM API host that no provider is configured for, else None."""
        return None if host in self.provider_by_host else self.llm_hosts.vendor_of(host)

    def llm_host_refusal(self, host: str, vendor: str) -> str | None:
        """Why a call to a catalogued LLM API host that no provider covers is refused, or None: `egress:
        allowlist` refuses it as any host that is not a provider's, else `unknown_llm_hosts` decides."""
        if self.unknown_llm_hosts != "refuse":
            return self.egress_refusal(host)
        return f"{host} is an LLM API host ({vendor}) no provider is configured for (unknown_llm_hosts: refuse)"

    def intercepts_redirected(self, name: str) -> bool:
        """Whether TLS that the kernel redirected here (transparent mode) for `name` is opened up: a
        provider's, to govern its calls, and any other that egress refuses, since there was no CONNECT
        to refuse: its requests are then answered, and audited, as refused."""
        return self.intercepts(name) or not self.egress_allowed(name)

    def egress_refusal(self, host: str) -> str | None:
        """Why traffic to `host` may not pass (`egress: allowlist` and not a provider's), or None."""
        return None if self.egress_allowed(host) else f"egress to {host} is not allowed"

    def egress_allowed(self, host: str) -> bool:
        """Whether proxy-mode traffic may go to `host`: any host passes, unless `egress: allowlist`."""
        return not self.allowlist or host in self.provider_by_host

    def upstream(self, provider: str) -> Upstream:
        return self.upstreams[provider]


def host_conflict(target_host: str, host_header: str | None) -> bool:
    """Whether a request names another host in its Host header than the one it is sent to: routing
    trusts the target, so such a request is refused rather than routed one way and read another."""
    if not host_header:
        return False
    named = urlsplit(f"//{host_header}").hostname or ""
    return named.lower() != target_host.lower()


def provider_route(provider: str, path: str, query: str, base_path: str) -> ProviderRoute | BadPath:
    """The path in its normal form: what the policy matches is what is forwarded (see paths.py)."""
    try:
        path = normalise_path(path)
    except UnsafePath as e:
        return BadPath(provider, str(e))
    # A host whose API lives under a path (Groq's /openai/v1): that path is the upstream URL's.
    if base_path and path.startswith(base_path + "/"):
        path = path.removeprefix(base_path)
    return ProviderRoute(provider, path, query)
