"""Fixtures for end-to-end tests: the mock provider, a real proxy with the addon, keys.

The proxy is `agentkeys serve` (or, for a module that sets PROXY_LAUNCHER = "mitmdump", the addon
as a mitmdump script). One per test module (`proxy` is module-scoped): starting one takes about a second.
"""

import contextlib
import io
import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

try:  # the SDKs' own HTTP library: httpx2 under openai 2+ / anthropic 1+, httpx before (Python 3.11)
    import httpx2 as httpx  # noqa: F401 (re-exported to the tests)
except ImportError:
    import httpx  # noqa: F401

from agentkeys.audit import read_records
from agentkeys.cli import main as agentkeys_main
from agentkeys.ledger import Ledger, open_ledger
from agentkeys.policy import load_config
from agentkeys.pricing import Usage
from agentkeys.seal import SECRET_ENV
from mock_provider import MockProvider

REPO = Path(__file__).resolve().parent.parent
ADDON = REPO / "addon" / "agentkeys" / "addon.py"
# The interpreter the proxies run on: another venv's (say Python 3.11 with mitmproxy 11) to test that pairing.
PROXY_PYTHON = Path(os.environ.get("AGENTKEYS_PROXY_PYTHON", sys.executable))
MITMDUMP = PROXY_PYTHON.with_name("mitmdump")
OPENAI_REAL_KEY = "sk-test-real-openai"
ANTHROPIC_REAL_KEY = "sk-ant-test-real-anthropic"
# Real keys of the other providers the tests configure (the mock's defaults), by the variable holding each.
OTHER_REAL_KEYS = {
    "GEMINI_API_KEY": "test-real-gemini-key",
    "AZURE_OPENAI_API_KEY": "test-real-azure-key",
    "GROQ_API_KEY": "gsk-test-real-groq",
}
# One store secret for every proxy and CLI of the tests, as an operator gives the same one to every
# replica on a shared store (seal.py): proxies in separate folders share stores here.
os.environ.setdefault(SECRET_ENV, "test-store-secret-shared-by-every-replica")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, process: subprocess.Popen, log: Path, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"mitmdump exited with {process.returncode}:\n{log.read_text()}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"mitmdump did not listen on {port} within {timeout}s:\n{log.read_text()}")


def wait_for_store(config_path: Path, process: subprocess.Popen, log: Path, timeout: float = 30) -> None:
    """Wait until the proxy has opened (so created) its SQLite store: mitmdump may listen before its
    script has, and the CLI refuses to issue keys into a store that does not exist."""
    store = load_config(config_path).store_url
    if not store.startswith("sqlite:///"):
        return
    path, deadline = Path(store.removeprefix("sqlite:///")), time.monotonic() + timeout
    while not path.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the proxy did not open its store {path}:\n{log.read_text()}")
        time.sleep(0.05)


@dataclass
class Proxy:
    """A running mitmdump with the addon, and everything a test needs to talk to it."""

    dir: Path
    config_path: Path
    proxy_port: int
    gateway_port: int
    metrics_port: int
    process: subprocess.Popen
    log_path: Path

    @property
    def proxy_url(self) -> str:
        return f"http://127.0.0.1:{self.proxy_port}"

    @property
    def gateway_url(self) -> str:
        return f"http://127.0.0.1:{self.gateway_port}"

    @property
    def ca_bundle(self) -> Path:
        return self.dir / "certs" / "agentkeys-ca-bundle.pem"

    @property
    def audit_path(self) -> Path:
        return self.dir / "audit.jsonl"

    def audit(self) -> list[dict]:
        return read_records(self.audit_path)

    def records_for(self, key_id: str, count: int = 1, timeout: float = 10) -> list[dict]:
        """The audit records of one key, once there are `count` of them.

        A streamed response reaches the agent a moment before the proxy settles it, so tests wait
        for the record (written after the settlement) rather than racing it.
        """
        deadline = time.monotonic() + timeout
        while True:
            records = [r for r in self.audit() if r["key_id"] == key_id]
            if len(records) >= count or time.monotonic() > deadline:
                return records
            time.sleep(0.02)

    def ledger(self) -> Ledger:
        """A handle on the proxy's own store (SQLite file or Redis), as the CLI opens it."""
        config = load_config(self.config_path)
        return open_ledger(config.store_url, config.calendar)

    def cli(self, *args: str) -> int:
        return agentkeys_main(["--config", str(self.config_path), *args])

    def issue(self, policy: Path, *extra: str) -> dict:
        """Mint a key with the real CLI (`keys issue --json`) and return its JSON."""
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            assert self.cli("keys", "issue", str(policy), "--json", *extra) == 0
        return json.loads(out.getvalue())


def write_policy(directory: Path, name: str = "test", **fields) -> Path:
    policy = {
        "name": name,
        "ttl": "1h",
        "budget_usd": 1.0,
        "providers": ["openai", "anthropic"],
        "endpoints": ["POST /v1/chat/completions", "POST /v1/messages", "GET /v1/models"],
        "models": ["gpt-4o-mini*", "claude-haiku-4-5*"],
        "default_max_output_tokens": 256,
        **fields,
    }
    path = directory / f"{name}.policy.yaml"
    path.write_text(yaml.safe_dump(policy))
    return path


def start_proxy(
    directory: Path, mock: MockProvider, launcher: str = "serve", workers: int = 1, **config_fields
) -> Proxy:
    """A proxy on free ports in `directory`, as `agentkeys serve --workers N` runs it (one process unless
    `workers` says more), or with launcher="mitmdump" as a plain mitmdump script (every mitmdump addon
    loaded, the settings as mitmproxy options)."""
    directory.mkdir(parents=True, exist_ok=True)
    proxy_port, gateway_port, metrics_port = free_port(), free_port(), free_port()
    config = {
        "listen_host": "127.0.0.1",
        "proxy_port": proxy_port,
        "gateway_port": gateway_port,
        "metrics_port": metrics_port,
        "store": "sqlite:///agentkeys.db",
        "audit_log": "audit.jsonl",
        "certs_dir": "certs",
        "purge_interval": "1s",
        "providers": {
            "openai": {"upstream": mock.url},
            "anthropic": {"upstream": mock.url},
        },
        **config_fields,
    }
    config_path = directory / "agentkeys.yaml"
    config_path.write_text(yaml.safe_dump(config))
    assert agentkeys_main(["--config", str(config_path), "ca"]) == 0  # the CA and bundle, as a user would
    log_path = directory / "mitmdump.log"
    env = {**os.environ, "OPENAI_API_KEY": OPENAI_REAL_KEY, "ANTHROPIC_API_KEY": ANTHROPIC_REAL_KEY, **OTHER_REAL_KEYS}
    env.pop("HTTPS_PROXY", None)
    process = subprocess.Popen(
        proxy_command(launcher, config_path, proxy_port, gateway_port, workers),
        stdout=open(log_path, "w"),
        stderr=subprocess.STDOUT,
        env=env,
        cwd=directory,
    )
    proxy = Proxy(directory, config_path, proxy_port, gateway_port, metrics_port, process, log_path)
    wait_for_port(proxy_port, process, log_path)
    wait_for_port(gateway_port, process, log_path)
    if config["metrics_port"]:  # probes and metrics: served a moment after the listeners
        wait_for_port(config["metrics_port"], process, log_path)
    wait_for_store(config_path, process, log_path)
    if workers > 1 and config["metrics_port"]:
        wait_for_workers(proxy)
    return proxy


def wait_for_workers(proxy: Proxy, timeout: float = 60) -> None:
    """Wait until every worker is ready (the supervisor listens before its workers accept)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{proxy.metrics_port}/readyz", timeout=5) as answer:
                if answer.status == 200:
                    return
        except OSError:
            pass
        if proxy.process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the workers did not get ready:\n{proxy.log_path.read_text()}")
        time.sleep(0.1)


def proxy_command(launcher: str, config_path: Path, proxy_port: int, gateway_port: int, workers: int = 1) -> list[str]:
    if launcher == "serve":
        return [
            str(PROXY_PYTHON),
            "-m",
            "agentkeys.cli",
            "--config",
            str(config_path),
            "serve",
            "--workers",
            str(workers),
        ]
    assert launcher == "mitmdump", launcher
    return [
        str(MITMDUMP),
        "--mode", f"regular@127.0.0.1:{proxy_port}",
        "--mode", f"reverse:http://127.0.0.1:9@127.0.0.1:{gateway_port}",
        "--set", f"confdir={config_path.parent / 'certs'}",
        "--set", "flow_detail=0",
        "--set", "connection_strategy=lazy",
        "-s", str(ADDON),
        "--set", f"agentkeys_config={config_path}",
    ]  # fmt: skip


def assert_ledger_matches_audit(proxy: Proxy, key_id: str, audit: list[dict] | None = None, timeout: float = 10):
    """No silent money: the key's spend in the store is exactly the sum of its audit records' costs,
    and nothing of it is still held. Returns the key's record.

    A call settles a moment after its agent has the reply, so this waits up to `timeout` for the two
    to agree. `audit` is this proxy's own log unless given (several proxies sharing a store).
    """
    ledger = proxy.ledger()
    deadline = time.monotonic() + timeout
    try:
        while True:
            record = ledger.get_key(key_id)
            assert record is not None, f"key {key_id} is not in the store"
            records = audit if audit is not None else proxy.audit()
            audited = sum(r["cost_micros"] for r in records if r["key_id"] == key_id)
            if (record.held_micros, record.spent_micros) == (0, audited) or time.monotonic() > deadline:
                break
            time.sleep(0.05)
    finally:
        ledger.close()
    assert record.held_micros == 0, f"key {key_id}: {record.held_micros} micro-dollars still held"
    assert record.spent_micros == audited, f"key {key_id}: the store charged {record.spent_micros}, the audit {audited}"
    return record


def assert_books_balance(proxy: Proxy) -> None:
    """`assert_ledger_matches_audit` for every key of the store outside a tree of sub-agent keys, but
    for those about to expire (the proxy purges a key once it has expired: it may vanish mid-check).

    Not for a module that mints child keys: a finished child's spend moves to its parent and the child
    is purged, after which its parent's spend is more than its own audit records say (the sub-agent
    tests check a tree's books as a whole).
    """
    ledger = proxy.ledger()
    try:
        keys = ledger.list_keys()
    finally:
        ledger.close()
    parents = {key.parent_id for key in keys}
    lasting = time.time() + 60
    for key in keys:
        if key.parent_id is None and key.key_id not in parents and key.expires_at > lasting:
            assert_ledger_matches_audit(proxy, key.key_id)


def billed(mock, index: int = -1) -> Usage:
    """The usage the mock reported (and would bill) for a call."""
    reported = mock.reported[index]
    return Usage(
        input_tokens=reported["input_tokens"],
        output_tokens=reported["output_tokens"],
        cached_tokens=reported["cached_tokens"],
        cache_write_tokens=reported["cache_write_tokens"],
        reasoning_tokens=reported["reasoning_tokens"],
    )


def settled(proxy, key, count: int = 1) -> dict:
    """The key's last audit record, once the settlement is written; the ledger must agree with the audit."""
    records = proxy.records_for(key["id"], count)
    assert len(records) == count, records
    assert_ledger_matches_audit(proxy, key["id"])
    return records[-1]


def assert_metered(record: dict, usage: Usage, cost: int) -> None:
    """The audit record of a call metered from the provider's usage: its tokens and its cost, within its hold."""
    assert record["decision"] == "allow" and record["metering"] == "usage", record
    assert (record["input_tokens"], record["output_tokens"]) == (usage.input_tokens, usage.output_tokens)
    assert (record["cached_tokens"], record["cache_write_tokens"]) == (usage.cached_tokens, usage.cache_write_tokens)
    assert record["reasoning_tokens"] == usage.reasoning_tokens
    assert record["cost_micros"] == cost <= record["hold_micros"], "the hold must cover what the provider bills"


def stop_proxy(proxy: Proxy) -> None:
    proxy.process.terminate()
    try:
        proxy.process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proxy.process.kill()


@contextlib.contextmanager
def running_proxy(directory: Path, mock: MockProvider, launcher: str = "serve", **config_fields):
    """`start_proxy` for a `with` block: on leaving it, the books must balance, and the proxy stops."""
    proxy = start_proxy(directory, mock, launcher, **config_fields)
    try:
        yield proxy
        assert_books_balance(proxy)
    finally:
        stop_proxy(proxy)


@pytest.fixture(scope="module")
def mock():
    groq = OTHER_REAL_KEYS["GROQ_API_KEY"]
    provider = MockProvider(openai_key=OPENAI_REAL_KEY, anthropic_key=ANTHROPIC_REAL_KEY, extra_openai_keys=(groq,))
    provider.start()
    yield provider
    provider.stop()


@pytest.fixture(scope="module")
def proxy(mock, tmp_path_factory, request):
    """One proxy for the module: `agentkeys serve`, or what the module's PROXY_LAUNCHER names."""
    launcher = getattr(request.module, "PROXY_LAUNCHER", "serve")
    with running_proxy(tmp_path_factory.mktemp("proxy"), mock, launcher) as running:
        yield running
    log = running.log_path.read_text()
    for real_key in (OPENAI_REAL_KEY, ANTHROPIC_REAL_KEY, *OTHER_REAL_KEYS.values()):
        assert real_key not in log, "a real key reached the proxy's log"
    assert not re.search(r'File ".*/agentkeys/', log), f"the addon raised:\n{log}"


@pytest.fixture(autouse=True)
def _reset_mock(request):
    if "mock" in request.fixturenames:
        request.getfixturevalue("mock").reset()
