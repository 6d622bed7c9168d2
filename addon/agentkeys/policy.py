"""The two files users write: a key's policy (`*.policy.yaml`) and the proxy's config.

Both are pydantic models loaded through `yamlfile.load_yaml_model`, so a bad file is refused
with its file, line, field and reason. Parsing happens once, at load; the gate only reads the
resulting typed objects.
"""

import fnmatch
import functools
import hashlib
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal
from zoneinfo import ZoneInfoNotFoundError

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from agentkeys.ledger.periods import Calendar
from agentkeys.llmhosts import Catalogue, Vendors, catalogue
from agentkeys.paths import path_matches
from agentkeys.pricing import ConfigPrice, PriceTable, load_prices
from agentkeys.yamlfile import ConfigError, load_yaml_model

DURATION_PART = re.compile(r"(\d+)([smhd])")
SECONDS_PER_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400}


# Longer than any key should live, and short enough that a deadline stays a sane date.
MAX_DURATION_SECONDS = 3650 * 86400
# Far above any real budget, and far below what sums of micro-dollars can hold in the stores' 64-bit integers.
MAX_BUDGET_USD = 1_000_000_000


def parse_duration(value: str | int | float) -> int:
    """`90`, `"90s"`, `"5m"`, `"1h30m"`, `"2d"` → seconds."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{value!r} is not a duration (use e.g. 90s, 5m, 1h, 1h30m, 2d)")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = int(value)
    elif str(value).strip().isdigit():
        seconds = int(str(value).strip())
    else:
        text = str(value).strip().lower()
        parts = DURATION_PART.findall(text)
        if not parts or "".join(n + u for n, u in parts) != text:
            raise ValueError(f"{value!r} is not a duration (use e.g. 90s, 5m, 1h, 1h30m, 2d)")
        seconds = sum(int(n) * SECONDS_PER_UNIT[u] for n, u in parts)
    if seconds <= 0:
        raise ValueError("a duration must be positive")
    if seconds > MAX_DURATION_SECONDS:
        raise ValueError(f"{value!r} is longer than the longest duration allowed, 3650d")
    return seconds


Duration = Annotated[int, BeforeValidator(parse_duration)]
BudgetUsd = Annotated[float, Field(gt=0, le=MAX_BUDGET_USD, allow_inf_nan=False)]
_BUDGET = TypeAdapter(BudgetUsd)


def parse_budget(value: str | float) -> float:
    """A budget in USD: a finite number above 0 and at most MAX_BUDGET_USD; ValueError saying which it is not."""
    try:
        return _BUDGET.validate_python(value)
    except ValidationError as e:
        raise ValueError(f"{value!r}: {e.errors()[0]['msg']}") from None


BYTE_SIZE = re.compile(r"(\d+)\s*(|k|m|g|kib|mib|gib|kb|mb|gb)", re.IGNORECASE)
# `64m` and `64MiB` are binary (as mitmproxy's own size options), `100MB` is decimal (as a disk's).
BYTES_PER_UNIT = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "kib": 1024, "mib": 1024**2, "gib": 1024**3,
                  "kb": 1000, "mb": 1000**2, "gb": 1000**3}  # fmt: skip


def parse_byte_size(value: str | int) -> int:
    """`1048576`, `"512k"`, `"64MiB"`, `"1g"`, `"100MB"` → bytes."""
    if isinstance(value, int) and not isinstance(value, bool):
        size = value
    else:
        match = BYTE_SIZE.fullmatch(str(value).strip())
        if not match:
            raise ValueError(f"{value!r} is not a size (use e.g. 65536, 512k, 64MiB, 1g)")
        size = int(match[1]) * BYTES_PER_UNIT[match[2].lower()]
    if size <= 0:
        raise ValueError("a size must be positive")
    return size


ByteSize = Annotated[int, BeforeValidator(parse_byte_size)]


class EndpointRule(BaseModel):
    """`POST /v1/chat/completions`: a method (or `*`) and a path glob, in the provider's own paths.

    The glob is matched against the normalised path (see `paths`): `*` stays within one segment,
    `**` crosses them.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)
    method: str
    path: str

    @model_validator(mode="before")
    @classmethod
    def from_string(cls, value):
        if isinstance(value, str):
            method, _, path = value.strip().partition(" ")
            if not path.strip().startswith("/"):
                raise ValueError(f"{value!r}: write an endpoint as 'METHOD /path', e.g. 'POST /v1/chat/completions'")
            return {"method": method, "path": path.strip()}
        return value

    @field_validator("method")
    @classmethod
    def upper_method(cls, method: str) -> str:
        return method.upper()

    def matches(self, method: str, path: str) -> bool:
        return self.method in ("*", method.upper()) and path_matches(self.path, path)

    def __str__(self) -> str:
        return f"{self.method} {self.path}"


class RateLimits(BaseModel):
    """How fast a key (or, through its plan, an account) may call: none of them set means no limit.

    Requests and tokens per minute are token buckets, as the providers' own limits are: a minute's
    allowance at once, refilled continuously (see `ledger.limits`).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)
    requests_per_minute: int | None = Field(default=None, gt=0, le=10**9)
    tokens_per_minute: int | None = Field(
        default=None, gt=0, le=10**15, description="a call counts its input bound and output limit until it settles"
    )
    concurrent_calls: int | None = Field(default=None, gt=0, le=10**6, description="calls in flight at once")

    def narrowed_by(self, other: "RateLimits") -> "RateLimits":
        """The tighter of the two for each limit."""
        return RateLimits(**{name: min_given(getattr(self, name), getattr(other, name)) for name in RATE_LIMIT_NAMES})

    def wider_than(self, outer: "RateLimits") -> list[str]:
        """The limits this sets looser than `outer` sets them."""
        return [
            name for name in RATE_LIMIT_NAMES
            if None not in (getattr(self, name), getattr(outer, name)) and getattr(self, name) > getattr(outer, name)
        ]  # fmt: skip

    @property
    def any(self) -> bool:
        return any(getattr(self, name) is not None for name in RATE_LIMIT_NAMES)


RATE_LIMIT_NAMES = ("requests_per_minute", "tokens_per_minute", "concurrent_calls")
IDENTICAL_CALLS = re.compile(r"\s*(\d+)\s+per\s+(\S+)\s*", re.IGNORECASE)


def min_given(*values: int | None) -> int | None:
    given = [value for value in values if value is not None]
    return min(given) if given else None


class IdenticalCalls(BaseModel):
    """`max_identical_calls: 5 per 10m`: the same request (its parsed body, canonicalised) sent by one key
    more than `calls` times within `window` is an agent stuck in a loop; the call is refused."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    calls: int = Field(gt=0, le=10_000)
    window: Duration

    @model_validator(mode="before")
    @classmethod
    def from_string(cls, value):
        if isinstance(value, str):
            match = IDENTICAL_CALLS.fullmatch(value)
            if not match:
                raise ValueError(f"{value!r}: write it as 'N per WINDOW', e.g. '5 per 10m'")
            return {"calls": int(match[1]), "window": match[2]}
        return value

    def within(self, outer: "IdenticalCalls") -> bool:
        """As tight as `outer` or tighter: no more calls, over a window at least as long."""
        return self.calls <= outer.calls and self.window >= outer.window

    def __str__(self) -> str:
        return f"{self.calls} per {format_duration(self.window)}"


def format_duration(seconds: float) -> str:
    """Seconds as the largest whole unit that fits them: 600 → 10m, 90 → 90s."""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"


class Policy(BaseModel):
    """What a key may do. `ttl` and `budget_usd` are defaults that `keys issue` may override."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1)
    description: str = ""
    ttl: Duration = 3600
    budget_usd: BudgetUsd
    providers: list[str] = Field(min_length=1)
    endpoints: list[EndpointRule] = Field(min_length=1)
    models: list[str] = Field(min_length=1, description="globs, e.g. gpt-4o-mini*")
    default_max_output_tokens: int | None = Field(default=None, gt=0)
    max_output_tokens: int | None = Field(
        default=None, gt=0,
        description="an output ceiling: a call asking for more (or for the model's limit) is sent with this",
    )
    clamp_max_tokens: bool = Field(
        default=False, description="send a call that would not fit with its output limit lowered to what remains"
    )
    unmetered_endpoints: list[EndpointRule] = Field(
        default_factory=list, description="endpoints the proxy cannot meter, allowed anyway and forwarded unmetered"
    )
    enforcement: Literal["enforce", "shadow"] | None = Field(
        default=None, description="shadow: calls this policy would refuse are forwarded and audited would_deny;"
        " unset: the proxy config's `enforcement`",
    )  # fmt: skip
    max_child_depth: int = Field(default=0, ge=0, description="levels of sub-agent keys below a key; 0: none")
    max_children: int = Field(default=10, ge=0, description="live child keys one key may have at once")
    rate_limits: RateLimits = Field(default_factory=RateLimits)
    max_identical_calls: IdenticalCalls | None = Field(
        default=None, description="the loop breaker: 'N per WINDOW' identical requests, no more"
    )
    max_calls: int | None = Field(default=None, gt=0, description="calls a key may make in its whole life")

    def allows_endpoint(self, method: str, path: str) -> bool:
        return any(rule.matches(method, path) for rule in self.endpoints)

    def allows_unmetered(self, method: str, path: str) -> bool:
        return any(rule.matches(method, path) for rule in self.unmetered_endpoints)

    def allows_model(self, model: str) -> bool:
        return any(fnmatch.fnmatchcase(model, pattern) for pattern in self.models)


def load_policy(path: Path) -> Policy:
    return load_yaml_model(Path(path), Policy)


@functools.lru_cache(maxsize=1024)
def parse_stored_policy(policy_json: str) -> Policy:
    """Policies are stored as JSON beside each key; parse each distinct one once."""
    return Policy.model_validate_json(policy_json)


class ProviderConfig(BaseModel):
    """Where a provider lives and where its real key comes from."""

    model_config = ConfigDict(extra="forbid")
    format: Literal["openai", "anthropic", "gemini", "azure"]
    upstream: str = Field(description="base URL the proxy forwards to, e.g. https://api.openai.com")
    hosts: list[str] = Field(default_factory=list, description="hostnames intercepted in proxy mode")
    key_env: str = Field(description="environment variable holding the real provider key")
    deployments: dict[str, str] = Field(
        default_factory=dict, description="Azure deployment name -> the model it serves (for prices and policies)"
    )

    @field_validator("upstream")
    @classmethod
    def http_url(cls, url: str) -> str:
        if not re.match(r"^https?://[^/]+", url):
            raise ValueError(f"{url!r} is not an http(s) URL")
        return url.rstrip("/")

    def real_key(self) -> str | None:
        return os.environ.get(self.key_env) or None


DEFAULT_PROVIDERS = {
    "openai": {
        "format": "openai",
        "upstream": "https://api.openai.com",
        "hosts": ["api.openai.com"],
        "key_env": "OPENAI_API_KEY",
    },
    "anthropic": {
        "format": "anthropic",
        "upstream": "https://api.anthropic.com",
        "hosts": ["api.anthropic.com"],
        "key_env": "ANTHROPIC_API_KEY",
    },
    "gemini": {
        "format": "gemini",
        "upstream": "https://generativelanguage.googleapis.com",
        "hosts": ["generativelanguage.googleapis.com"],
        "key_env": "GEMINI_API_KEY",
    },
}


# mitmproxy options that print a forwarded request, real key and all, to the log (mitmdump's headers and
# bodies, the proxy core's every event): name → (the safe value, whether a value would show a real key).
KEY_SHOWING_OPTIONS = {
    "flow_detail": (1, lambda value: value >= 2),
    "proxy_debug": (False, bool),
}


def key_showing(options: dict[str, object]) -> dict[str, object]:
    """Of `options` (by name), those whose value would print a real key, with the safe value for each."""
    return {
        name: safe
        for name, (safe, shows_keys) in KEY_SHOWING_OPTIONS.items()
        if name in options and shows_keys(options[name])
    }


# mitmproxy options that `agentkeys serve` sets itself, so a config's `mitmproxy` section may not.
SERVE_OWN_OPTIONS = frozenset({"mode", "confdir", "connection_strategy", "scripts"})


class IssuerConfig(BaseModel):
    """A program (a CI system) allowed to mint keys remotely with a token, from these policies only."""

    model_config = ConfigDict(extra="forbid")
    token_env: str = Field(description="environment variable holding the issuer's token")
    policies: list[str] = Field(min_length=1, description="policy files this issuer may issue keys from")


GITHUB_ACTIONS_ISSUER = "https://token.actions.githubusercontent.com"
# Claims that name one repository or owner: a GitHub rule must name one, since every repository on GitHub
# can ask GitHub for a token with any audience.
GITHUB_PINNING_CLAIMS = ("repository", "repository_owner", "job_workflow_ref", "sub")


def one_or_many(value):
    """A claim condition is a glob or a list of globs."""
    return [value] if isinstance(value, str) else value


Globs = Annotated[list[str], BeforeValidator(one_or_many), Field(min_length=1)]


class ClaimMatch(BaseModel):
    """Which tokens a rule is for: every claim it names must match one of its globs."""

    model_config = ConfigDict(extra="forbid")
    # GitHub Actions
    repository: Globs | None = None
    repository_owner: Globs | None = None
    ref: Globs | None = None
    environment: Globs | None = None
    workflow: Globs | None = None
    job_workflow_ref: Globs | None = None
    event_name: Globs | None = None
    # Kubernetes (from the `kubernetes.io` claims, else from `sub`: system:serviceaccount:NAMESPACE:NAME)
    namespace: Globs | None = None
    serviceaccount: Globs | None = None
    # any issuer
    sub: Globs | None = None

    @model_validator(mode="after")
    def names_a_claim(self):
        if not self.conditions():
            raise ValueError("name at least one claim to match (say repository, or namespace and serviceaccount)")
        return self

    def conditions(self) -> dict[str, list[str]]:
        return {name: globs for name, globs in self if globs is not None}


class IdentityRule(BaseModel):
    """Tokens that match get a key under `policy`, with at most this budget and lifetime."""

    model_config = ConfigDict(extra="forbid")
    match: ClaimMatch
    policy: str = Field(description="the policy file of the keys this rule grants")
    budget_usd: float | None = Field(default=None, gt=0, description="the key's budget ceiling; default the policy's")
    ttl: Duration | None = Field(default=None, description="the key's lifetime ceiling; default the policy's")


class IdentityConfig(BaseModel):
    """An OIDC issuer whose tokens are exchanged for keys (GitHub Actions, a Kubernetes cluster), and its rules."""

    model_config = ConfigDict(extra="forbid")
    issuer: str = Field(min_length=1, description="the tokens' `iss`, exactly")
    audience: str = Field(min_length=1, description="the `aud` tokens must carry for this proxy")
    jwks_url: str | None = Field(default=None, description="where the issuer publishes its signing keys")
    jwks_file: str | None = Field(default=None, description="the issuer's signing keys in a file (offline clusters)")
    rules: list[IdentityRule] = Field(min_length=1, description="the first rule whose claims match decides")

    @field_validator("jwks_url")
    @classmethod
    def http_url(cls, url: str | None) -> str | None:
        if url is not None and not re.match(r"^https?://[^/]+", url):
            raise ValueError(f"{url!r} is not an http(s) URL")
        return url

    @model_validator(mode="after")
    def one_key_source(self):
        if (self.jwks_url is None) == (self.jwks_file is None):
            raise ValueError("give the issuer's keys as exactly one of jwks_url or jwks_file")
        return self

    @model_validator(mode="after")
    def github_rules_name_a_repository(self):
        if self.issuer.rstrip("/") != GITHUB_ACTIONS_ISSUER:
            return self
        for index, rule in enumerate(self.rules):
            if not set(rule.match.conditions()) & set(GITHUB_PINNING_CLAIMS):
                raise ValueError(
                    f"rules.{index}.match: any repository on GitHub can get a token for this audience;"
                    f" name one of {', '.join(GITHUB_PINNING_CLAIMS)}"
                )
        return self


class AlertsConfig(BaseModel):
    """Webhooks the proxy posts (JSON, HMAC-signed) when a key crosses a budget threshold or a loop is broken."""

    model_config = ConfigDict(extra="forbid")
    url: str = Field(description="where alerts are posted")
    secret_env: str = Field(description="environment variable holding the secret the HMAC signature is made with")
    budget_thresholds: list[int] = Field(
        default_factory=lambda: [50, 80, 100], description="percentages of a key's budget spent that raise an alert"
    )
    loops: bool = Field(default=True, description="alert when the loop breaker refuses a key's call")
    timeout: Duration = Field(default=5, description="how long one delivery may take")
    attempts: int = Field(default=5, ge=1, le=20, description="deliveries tried, with doubling waits between them")
    retry_backoff: Duration = Field(default=1, description="the wait before the second attempt; doubled each time")
    queue_size: int = Field(default=1000, ge=1, description="alerts waiting to be delivered; more are dropped")

    @field_validator("url")
    @classmethod
    def http_url(cls, url: str) -> str:
        if not re.match(r"^https?://[^/]+", url):
            raise ValueError(f"{url!r} is not an http(s) URL")
        return url

    @field_validator("budget_thresholds")
    @classmethod
    def percentages(cls, thresholds: list[int]) -> list[int]:
        wrong = [value for value in thresholds if not 0 < value <= 100]
        if wrong:
            raise ValueError(f"{wrong}: a threshold is a percentage of the budget, from 1 to 100")
        return sorted(set(thresholds))

    def secret(self) -> str | None:
        return os.environ.get(self.secret_env) or None


class ProxyConfig(BaseModel):
    """The proxy's own settings. Relative paths are relative to the config file's folder."""

    model_config = ConfigDict(extra="forbid")
    listen_host: str = "127.0.0.1"
    proxy_port: int = Field(default=8080, ge=0, le=65535)
    gateway_port: int = Field(default=8081, ge=0, le=65535)
    transparent_port: int | None = Field(
        default=None, ge=1, le=65535,
        description="transparent mode: connections the kernel redirected here (iptables REDIRECT, sidecar-init)",
    )  # fmt: skip
    store: str = "sqlite:///agentkeys.db"
    audit_log: str | None = "audit.jsonl"
    audit_sinks: list[Literal["file", "stdout"]] | None = Field(
        default=None,
        min_length=1,
        description="where each audit record goes: file (audit_log), stdout (JSON lines for log collectors)",
    )
    audit_rotate_bytes: ByteSize | None = Field(default=None, gt=0, description="start a new file past this size")
    audit_rotate_interval: Duration | None = Field(default=None, description="start a new file after this long")
    audit_checkpoint_interval: Duration = Field(default=10, description="how often the audit log is signed")
    metrics_port: int | None = Field(default=9464, ge=0, le=65535)
    certs_dir: str = "certs"
    enforcement: Literal["enforce", "shadow"] = Field(
        default="enforce",
        description="shadow: calls that would be refused are forwarded and audited would_deny (a policy may say"
        " otherwise for its keys)",
    )
    real_keys: Literal["refuse", "audit"] = Field(
        default="refuse",
        description="a provider call carrying a real provider key and no agent key: refused, or passed on untouched"
        " and audited with the key's fingerprint",
    )
    unknown_llm_hosts: Literal["refuse", "audit", "pass"] = Field(
        default="audit",
        description="a call to a catalogued LLM API host no provider is configured for: audited, then refused,"
        " passed with a warning in the log (audit), or passed",
    )
    llm_hosts: Vendors = Field(
        default_factory=dict,
        description="LLM API hosts by vendor, over the shipped catalogue: a vendor named here replaces its hosts"
        " there, an empty list removes it",
    )
    llm_hosts_file: str | None = Field(default=None, description="a catalogue replacing the shipped one")
    egress: Literal["passthrough", "allowlist"] = Field(
        default="passthrough",
        description="non-provider hosts in proxy mode: pass through as an untouched tunnel, or refuse",
    )
    log_format: Literal["text", "json"] = Field(
        default="text", description="`agentkeys serve`'s log: text for people, json (one object a line) for collectors"
    )
    purge_interval: Duration = 60
    shutdown_grace: Duration = Field(
        default=30, description="on SIGTERM, how long calls and streams in flight may take to finish"
    )
    stale_hold_after: Duration = Field(
        default=900,
        description="a hold unrenewed this long (its proxy renews it every purge_interval) was left by a proxy"
        " that died; it is charged in full",
    )
    max_request_bytes: ByteSize = Field(
        default=64 * 1024**2, description="a larger request body is refused (413) before it is read for metering"
    )
    max_stream_event_bytes: ByteSize = Field(
        default=16 * 1024**2,
        description="a larger server-sent event ends metering: the rest of the stream passes through, charged its hold",
    )
    max_connections: int = Field(default=512, ge=1, description="client connections open at once")
    header_timeout: Duration = Field(default=10, description="a new connection's first request must arrive by then")
    idle_timeout: Duration = Field(default=120, description="a connection with no request in flight is closed after")
    providers: dict[str, ProviderConfig] = Field(default_factory=dict)
    prices_file: str | None = Field(default=None, description="price overrides in LiteLLM's price-map format")
    prices: dict[str, dict[str, ConfigPrice]] = Field(
        default_factory=dict, description="price overrides: provider -> model -> USD per million tokens"
    )
    issuers: dict[str, IssuerConfig] = Field(default_factory=dict)
    policies: list[str] = Field(
        default_factory=list,
        description="policy files (globs allowed) whose current text narrows the keys issued from them",
    )
    identity: dict[str, IdentityConfig] = Field(
        default_factory=dict, description="OIDC issuers whose tokens are exchanged for keys (keyless issuance)"
    )
    plans: list[str] = Field(default_factory=list, description="plan files (globs allowed) accounts may be on")
    time_zone: str = Field(default="UTC", description="accounts' days, weeks and months are this zone's (IANA name)")
    admin_port: int | None = Field(
        default=None, ge=0, le=65535, description="the admin API's own listener (accounts, keys, usage); off if unset"
    )
    admin_host: str | None = Field(default=None, description="the admin API's address; default listen_host")
    admin_token_env: str = Field(
        default="AGENTKEYS_ADMIN_TOKEN", description="environment variable holding the admin API's bearer token"
    )
    alerts: AlertsConfig | None = Field(default=None, description="webhooks at budget thresholds and broken loops")
    mitmproxy: dict[str, str | int | bool | list[str]] = Field(
        default_factory=dict,
        description="mitmproxy options for `agentkeys serve`, by name (say ssl_verify_upstream_trusted_ca)",
    )
    base_dir: Path = Field(default=Path("."), exclude=True)

    @field_validator("store")
    @classmethod
    def known_store(cls, url: str) -> str:
        if not url.startswith(("sqlite:///", "redis://", "rediss://")):
            raise ValueError(f"{url!r}: the store must be sqlite:///PATH or redis://HOST:PORT/DB (rediss:// for TLS)")
        return url

    @field_validator("time_zone")
    @classmethod
    def known_time_zone(cls, name: str) -> str:
        try:
            Calendar(name)
        except (ValueError, ZoneInfoNotFoundError):
            raise ValueError(f"{name!r} is not a time zone this system knows (say UTC or Europe/Paris)") from None
        return name

    @field_validator("mitmproxy")
    @classmethod
    def not_the_proxys_own(cls, options: dict) -> dict:
        own = sorted(name for name in options if name in SERVE_OWN_OPTIONS or name.startswith("agentkeys_"))
        if own:
            raise ValueError(
                f"{', '.join(own)}: set by agentkeys serve from this config (proxy_port, gateway_port, certs_dir, …)"
            )
        unsafe = key_showing(options)
        if unsafe:
            raise ValueError(f"{', '.join(unsafe)}: would print the real provider keys to the proxy's log")
        return options

    @field_validator("audit_sinks")
    @classmethod
    def file_sink_has_a_file(cls, sinks: list[str] | None, info: ValidationInfo) -> list[str] | None:
        if sinks and "file" in sinks and info.data.get("audit_log") is None:
            raise ValueError("the file sink needs audit_log (a path); or list only stdout")
        return sinks

    @model_validator(mode="before")
    @classmethod
    def merge_default_providers(cls, data):
        """A config names only what it changes: `openai: {upstream: ...}` keeps the other defaults."""
        if not isinstance(data, dict):
            return data
        given = data.get("providers") or {}
        if not isinstance(given, dict):
            return data
        merged = {name: dict(spec) for name, spec in DEFAULT_PROVIDERS.items()}
        for name, spec in given.items():
            merged[name] = {**merged.get(name, {}), **spec} if isinstance(spec, dict) else spec
        return {**data, "providers": merged}

    def path(self, value: str) -> Path:
        return (self.base_dir / value).resolve()

    def issuers_policy_files(self) -> list[str]:
        """The policy files keys are issued from: issuer tokens' and identity rules'."""
        rules = [rule.policy for identity in self.identity.values() for rule in identity.rules]
        return [path for issuer in self.issuers.values() for path in issuer.policies] + rules

    def llm_catalogue(self) -> Catalogue:
        """The LLM API hosts to recognise: the shipped catalogue (or `llm_hosts_file`), with `llm_hosts` on top."""
        return catalogue(self.path(self.llm_hosts_file) if self.llm_hosts_file else None, self.llm_hosts)

    def price_table(self) -> PriceTable:
        """The bundled prices with this config's overrides: its `prices_file`, then its `prices`."""
        prices_file = self.path(self.prices_file) if self.prices_file else None
        return load_prices(prices_file, self.prices, self.providers)

    @property
    def audit_sinks_used(self) -> list[str]:
        """The sinks named, else the file when there is an `audit_log`."""
        if self.audit_sinks is not None:
            return self.audit_sinks
        return ["file"] if self.audit_log else []

    @property
    def calendar(self) -> Calendar:
        """The calendar accounts' periods follow."""
        return Calendar(self.time_zone)

    @property
    def store_url(self) -> str:
        """`store`, with a SQLite file's path made absolute (a relative one is the config folder's)."""
        if not self.store.startswith("sqlite:///"):
            return self.store
        return f"sqlite:///{self.path(self.store.removeprefix('sqlite:///'))}"


@dataclass(frozen=True)
class PolicyFile:
    """A policy as its file says now, and which revision of the file that is (for the audit)."""

    policy: Policy
    revision: str  # the first 12 hex digits of the file's SHA-256


@dataclass(frozen=True)
class Scope:
    """What a key may do now: what every one of `policies` allows. A key's scope is the copy of its
    policy taken when it was issued, narrowed by the policy's file as it is now (when the proxy knows
    the file): tightening the file reaches keys already issued, loosening it only new ones."""

    policies: tuple[Policy, ...]
    revision: str | None = None  # of the policy file that narrowed it, for the audit

    @property
    def name(self) -> str:
        return self.policies[0].name

    @property
    def providers(self) -> list[str]:
        return [p for p in self.policies[0].providers if all(p in policy.providers for policy in self.policies)]

    @property
    def endpoints(self) -> list[EndpointRule]:
        return self.policies[-1].endpoints  # the newest, for messages; allows_endpoint asks them all

    @property
    def models(self) -> list[str]:
        return self.policies[-1].models

    @property
    def default_max_output_tokens(self) -> int | None:
        given = [p.default_max_output_tokens for p in self.policies if p.default_max_output_tokens is not None]
        return min(given) if given else None

    @property
    def max_output_tokens(self) -> int | None:
        given = [p.max_output_tokens for p in self.policies if p.max_output_tokens is not None]
        return min(given) if given else None

    @property
    def clamp_max_tokens(self) -> bool:
        return all(policy.clamp_max_tokens for policy in self.policies)

    @property
    def enforcement(self) -> str | None:
        """The newest file's say (the current file when the proxy has it), both ways: enforcement is the
        operator's rollout switch, not a permission, so going back to shadow reaches keys already out too."""
        return self.policies[-1].enforcement

    @property
    def rate_limits(self) -> RateLimits:
        limits = self.policies[0].rate_limits
        for policy in self.policies[1:]:
            limits = limits.narrowed_by(policy.rate_limits)
        return limits

    @property
    def max_identical_calls(self) -> list[IdenticalCalls]:
        """Every policy's loop breaker: each is checked, so the file's and the issued copy's both hold."""
        return list(dict.fromkeys(p.max_identical_calls for p in self.policies if p.max_identical_calls))

    @property
    def max_calls(self) -> int | None:
        return min_given(*(policy.max_calls for policy in self.policies))

    def allows_endpoint(self, method: str, path: str) -> bool:
        return all(policy.allows_endpoint(method, path) for policy in self.policies)

    def allows_unmetered(self, method: str, path: str) -> bool:
        return all(policy.allows_unmetered(method, path) for policy in self.policies)

    def allows_model(self, model: str) -> bool:
        return all(policy.allows_model(model) for policy in self.policies)


def scope_of(policy_json: str, current: "dict[str, PolicyFile]") -> Scope:
    """A key's scope, from the policy stored with it and the current files by name."""
    issued = parse_stored_policy(policy_json)
    now = current.get(issued.name)
    return Scope((issued, now.policy), now.revision) if now else Scope((issued,))


def current_policies(config: ProxyConfig) -> dict[str, PolicyFile]:
    """The policies the proxy keeps in step with their files, by name: the config's `policies` and every
    issuer's. A key issued from one of them is bound by the file as it is now, as well as by the copy
    taken when it was issued, so tightening a file reaches keys already out."""
    paths = [config.path(path) for path in config.issuers_policy_files()]
    for pattern in config.policies:
        matched = sorted(config.base_dir.glob(pattern)) if any(c in pattern for c in "*?[") else [config.path(pattern)]
        paths.extend(path.resolve() for path in matched)
    found: dict[str, PolicyFile] = {}
    for path in dict.fromkeys(paths):
        policy = load_policy(path)
        if policy.name in found and found[policy.name].revision != file_revision(path):
            raise ConfigError([f"{path}: name: policy {policy.name} is also defined by another file"])
        found[policy.name] = PolicyFile(policy, file_revision(path))
    return found


def file_revision(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:12]


def load_config(path: Path | None) -> ProxyConfig:
    """The proxy config at `path`, or the defaults (relative to the current folder) when None."""
    if path is None:
        return ProxyConfig.model_validate({"base_dir": Path.cwd()})
    config = load_yaml_model(Path(path), ProxyConfig)
    config.base_dir = Path(path).resolve().parent
    return config
