"""`agentkeys run`: a fresh key for one command, gone when the command ends.

Mints a key, runs the command with the environment an agent needs (every provider's key variable
set to the scoped key, the SDKs' base-URL variables set to the gateway, HTTPS_PROXY, the CA bundle
variables), revokes the key however the command ends (exit, failure, Ctrl-C), prints what it spent,
and exits with the command's status. With no proxy listening at the configured address, it runs one
for the duration of the command. With `isolate`, the command runs in a network namespace whose only
way out is the proxy (`isolate.py`), for agents that heed none of these variables.
"""

import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter, defaultdict
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit

from agentkeys.audit import read_records
from agentkeys.certs import agent_environment, ensure_ca
from agentkeys.isolate import command_in, isolated
from agentkeys.keys import IssuedKey, issue_key
from agentkeys.ledger import Ledger
from agentkeys.money import format_usd
from agentkeys.policy import Policy, ProxyConfig
from agentkeys.routing import CONTROL_HOST
from agentkeys.seal import store_seal

PROXY_START_TIMEOUT = 30
# The variable each SDK reads its base URL from, by the variable it reads its key from, and the path
# under the provider's gateway prefix it expects. Node's fetch ignores HTTPS_PROXY: these it obeys.
BASE_URL_VARIABLES = {
    "OPENAI_API_KEY": ("OPENAI_BASE_URL", "/v1"),
    "ANTHROPIC_API_KEY": ("ANTHROPIC_BASE_URL", ""),
    "GEMINI_API_KEY": ("GOOGLE_GEMINI_BASE_URL", ""),
    "AZURE_OPENAI_API_KEY": ("AZURE_OPENAI_ENDPOINT", ""),
}
SETTLE_TIMEOUT = 5


def run_with_key(
    config: ProxyConfig,
    config_path: Path | None,
    ledger: Ledger,
    policy: Policy,
    command: list[str],
    ttl_seconds: int | None,
    budget_usd: float | None,
    proxy_url: str | None,
    isolate: bool = False,
) -> int:
    name, seal = f"run: {' '.join(command)[:60]}", store_seal(config.path(config.certs_dir))
    issued = issue_key(ledger, policy, ttl_seconds, budget_usd, name=name, seal=seal)
    print(f"agentkeys: key {issued.record.key_id} ({format_usd(issued.record.budget_micros)})", file=sys.stderr)
    try:
        with proxy_for(config, config_path, proxy_url) as (proxy, gateway):
            env = agent_env(config, issued, proxy, gateway)
            if isolate:
                status = run_isolated(config, command, env, proxy, gateway)
            else:
                status = run_command(command, env)
    finally:
        ledger.revoke(issued.record.key_id, time.time())
        print_spend(config, ledger, issued)
    return status


def run_isolated(config: ProxyConfig, command: list[str], env: dict[str, str], proxy: str, gateway: str) -> int:
    """The command in a namespace of its own, the proxy its only way out: it needs no HTTPS_PROXY there."""
    hosts = [host for spec in config.providers.values() for host in spec.hosts] + [CONTROL_HOST]
    with isolated(hosts, proxy, gateway) as namespace:
        print(f"agentkeys: running in network namespace {namespace}; its only way out is the proxy", file=sys.stderr)
        return run_command(command_in(namespace, command), {k: v for k, v in env.items() if k != "HTTPS_PROXY"})


@contextmanager
def proxy_for(config: ProxyConfig, config_path: Path | None, proxy_url: str | None):
    """The proxy to use, and its gateway: the one given, the one already listening, or one started for
    the command. A proxy given by URL is taken to have its gateway on the config's gateway_port."""
    if proxy_url:
        yield proxy_url, f"http://{urlsplit(proxy_url).hostname}:{config.gateway_port}"
        return
    url = f"http://{config.listen_host}:{config.proxy_port}"
    gateway = f"http://{config.listen_host}:{config.gateway_port}"
    if listening(config.listen_host, config.proxy_port):
        yield url, gateway
        return
    log = config.path("agentkeys-run-proxy.log")
    config_args = ["--config", str(config_path)] if config_path else []
    server = subprocess.Popen(
        [sys.executable, "-m", "agentkeys.cli", *config_args, "serve"],
        stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:
        wait_until_listening(config, server, log)
        print(f"agentkeys: started a proxy at {url} for this command (log: {log})", file=sys.stderr)
        warn_of_missing_real_keys(config)
        yield url, gateway
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()


def warn_of_missing_real_keys(config: ProxyConfig) -> None:
    """The proxy started here logs to a file the user does not read: say on the terminal what it cannot serve."""
    for name, spec in config.providers.items():
        if not spec.real_key():
            print(
                f"agentkeys: warning: {spec.key_env} is not set, so the proxy refuses every {name} call;"
                f" set it in this shell to let the command use {name}",
                file=sys.stderr,
            )


def listening(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=0.5).close()
        return True
    except OSError:
        return False


def wait_until_listening(config: ProxyConfig, server: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + PROXY_START_TIMEOUT
    while not (listening(config.listen_host, config.proxy_port) and listening(config.listen_host, config.gateway_port)):
        if server.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the proxy did not start; see {log}")
        time.sleep(0.1)


def agent_env(config: ProxyConfig, issued: IssuedKey, proxy_url: str, gateway_url: str) -> dict[str, str]:
    """The command's environment: no real provider key survives into it, and every SDK that reads a
    base URL from its environment is pointed at the gateway."""
    env = dict(os.environ)
    certs_dir = config.path(config.certs_dir)
    ensure_ca(certs_dir)
    env.update(agent_environment(certs_dir, proxy_url))
    env["AGENTKEYS_KEY_ID"] = issued.record.key_id
    for name, provider in config.providers.items():
        env[provider.key_env] = issued.key
        if provider.key_env in BASE_URL_VARIABLES:
            variable, suffix = BASE_URL_VARIABLES[provider.key_env]
            env[variable] = f"{gateway_url}/{name}{suffix}"
    return env


def run_command(command: list[str], env: dict[str, str]) -> int:
    """Run to the end; an interrupt is passed on to the command, which is then waited for."""
    try:
        child = subprocess.Popen(command, env=env)
    except OSError as e:
        print(f"agentkeys: cannot run {command[0]}: {e.strerror}", file=sys.stderr)
        return 127
    interrupted = False

    def pass_on(signum, _frame):
        nonlocal interrupted
        interrupted = True
        child.send_signal(signum)

    previous = {sig: signal.signal(sig, pass_on) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        status = child.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if status < 0:
        return 128 - status  # killed by a signal: the shell's convention
    return 130 if interrupted and status == 0 else status


def print_spend(config: ProxyConfig, ledger: Ledger, issued: IssuedKey) -> None:
    """Calls, tokens and cost by model, from the audit log; the total from the ledger."""
    key_id = issued.record.key_id
    record = ledger.get_key(key_id)
    deadline = time.monotonic() + SETTLE_TIMEOUT
    while record and record.held_micros and time.monotonic() < deadline:  # the last calls settle just after
        time.sleep(0.05)
        record = ledger.get_key(key_id)
    calls = (
        [r for r in read_records(config.path(config.audit_log)) if r["key_id"] == key_id] if config.audit_log else []
    )
    # A refused call reached no model: it is counted apart, by status, not under a model of its own.
    refused = [call for call in calls if call["decision"] != "allow"]
    by_model = defaultdict(lambda: {"calls": 0, "input": 0, "output": 0, "micros": 0})
    for call in (call for call in calls if call["decision"] == "allow"):
        row = by_model[call["model"] or "(no model)"]  # a free call, say GET /v1/models
        row["calls"] += 1
        row["input"] += call["input_tokens"]
        row["output"] += call["output_tokens"]
        row["micros"] += call["cost_micros"]
    spent = record.spent_micros if record else sum(row["micros"] for row in by_model.values())
    print(f"agentkeys: key {key_id} revoked; {len(calls)} calls, spent {format_usd(spent)}", file=sys.stderr)
    for model, row in sorted(by_model.items()):
        print(
            f"  {model}: {row['calls']} calls, {row['input']} input + {row['output']} output tokens,"
            f" {format_usd(row['micros'])}",
            file=sys.stderr,
        )
    if refused:
        statuses = Counter(str(call["status"]) for call in refused)
        how = ", ".join(f"{count} × {status}" for status, count in sorted(statuses.items()))
        print(f"  refused by the proxy: {len(refused)} calls ({how})", file=sys.stderr)
