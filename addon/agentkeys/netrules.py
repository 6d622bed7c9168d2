"""`agentkeys sidecar-init`: the kernel rules that make the proxy an agent's only way out.

Written into the current network namespace (a Kubernetes pod's, shared by the agent and the proxy,
or one that `agentkeys run --isolate` made), as service meshes do: outgoing TCP to the redirected
ports (HTTP and HTTPS by default) is sent to the proxy's transparent listener, whatever address the
agent dialled; the proxy's own connections (its user id) are left alone, or they would come back to
it. With `drop_others`, anything else that leaves the namespace and is not the proxy's is refused,
so a port that is not redirected is no way around it either (loopback and DNS stay open: the agent
must reach the proxy and resolve the providers' names).

The rules live in chains of their own, so writing them twice changes nothing and `--remove` takes
away exactly what was written. IPv6 is refused rather than redirected (the transparent listener is
IPv4), so a client falls back to IPv4 and is redirected there.
"""

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

NAT_CHAIN = "AGENTKEYS_REDIRECT"
FILTER_CHAIN = "AGENTKEYS_EGRESS"
DEFAULT_PORTS = (80, 443)
DNS_PORT = 53


class RulesError(Exception):
    """The rules could not be written: the tool is missing, or the privilege to use it."""


@dataclass(frozen=True)
class RedirectSpec:
    """What `sidecar-init` writes, parsed once from its options."""

    to_port: int  # the proxy's transparent_port
    ports: tuple[int, ...] = DEFAULT_PORTS
    proxy_uid: int | None = None  # None only where the proxy does not dial from this namespace (run --isolate)
    drop_others: bool = False

    def __post_init__(self):
        for port in (self.to_port, *self.ports):
            if not 1 <= port <= 65535:
                raise ValueError(f"{port} is not a TCP port")
        if not self.ports:
            raise ValueError("give at least one port to redirect")
        if self.to_port in self.ports:
            raise ValueError(f"the proxy's port {self.to_port} cannot itself be redirected")


def parse_ports(text: str) -> tuple[int, ...]:
    """`80,443` → (80, 443)."""
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise ValueError(f"{text!r}: give ports as numbers separated by commas, e.g. 80,443") from None


@dataclass(frozen=True)
class Chain:
    """One of our chains: its rules, in a table of one tool, jumped to from OUTPUT."""

    tool: str  # iptables or ip6tables
    table: str
    name: str
    rules: tuple[tuple[str, ...], ...]


def chains(spec: RedirectSpec, ipv6: bool) -> list[Chain]:
    """The chains `spec` asks for: IPv4's redirect (and egress refusal), and IPv6's refusal."""
    not_the_proxy = () if spec.proxy_uid is None else ("-m", "owner", "!", "--uid-owner", str(spec.proxy_uid))
    redirected = ("-p", "tcp", "-m", "multiport", "--dports", ",".join(map(str, spec.ports)))
    redirect = (*redirected, *not_the_proxy, "-j", "REDIRECT", "--to-ports", str(spec.to_port))
    found = [Chain("iptables", "nat", NAT_CHAIN, (redirect,))]
    if spec.drop_others:
        found.append(Chain("iptables", "filter", FILTER_CHAIN, egress_rules(spec)))
    if ipv6:
        refused = (*redirected, *not_the_proxy, "-j", "REJECT")
        v6_rules = egress_rules(spec) if spec.drop_others else (refused,)
        found.append(Chain("ip6tables", "filter", FILTER_CHAIN, v6_rules))
    return found


def egress_rules(spec: RedirectSpec) -> tuple[tuple[str, ...], ...]:
    """Let through the proxy, loopback (where redirected connections go), DNS and replies; refuse the rest."""
    proxy = () if spec.proxy_uid is None else (("-m", "owner", "--uid-owner", str(spec.proxy_uid), "-j", "RETURN"),)
    return (
        *proxy,
        ("-o", "lo", "-j", "RETURN"),
        ("-p", "udp", "--dport", str(DNS_PORT), "-j", "RETURN"),
        ("-p", "tcp", "--dport", str(DNS_PORT), "-j", "RETURN"),
        ("-m", "conntrack", "--ctstate", "ESTABLISHED,RELATED", "-j", "RETURN"),
        ("-j", "REJECT"),
    )


def ipv6_enabled() -> bool:
    return Path("/proc/net/if_inet6").exists()


class Rules:
    """Runs the tools, in this namespace or (with a prefix such as `ip netns exec NAME`) in another."""

    def __init__(self, prefix: tuple[str, ...] = (), echo=print):
        self.prefix = prefix
        self.echo = echo

    def apply(self, spec: RedirectSpec) -> None:
        """Write the rules for `spec`, replacing any earlier ones of ours: running it twice changes nothing."""
        self.remove(quiet=True)
        for chain in chains(spec, ipv6_enabled()):
            self._run(chain.tool, "-t", chain.table, "-N", chain.name)
            for rule in chain.rules:
                self._run(chain.tool, "-t", chain.table, "-A", chain.name, *rule)
            self._run(chain.tool, "-t", chain.table, "-I", "OUTPUT", "1", "-j", chain.name)

    def remove(self, quiet: bool = False) -> None:
        """Take our chains out of every table, if there; nothing else is touched."""
        for tool, table, name in ((t, tb, n) for t in ("iptables", "ip6tables") for tb, n in TABLES_OF_CHAINS):
            if not self._exists(tool, table, name):
                continue
            while self._run(tool, "-t", table, "-C", "OUTPUT", "-j", name, check=False, quiet=True) == 0:
                self._run(tool, "-t", table, "-D", "OUTPUT", "-j", name, quiet=quiet)
            self._run(tool, "-t", table, "-F", name, quiet=quiet)
            self._run(tool, "-t", table, "-X", name, quiet=quiet)

    def _exists(self, tool: str, table: str, name: str) -> bool:
        if tool == "ip6tables" and not shutil.which(tool):
            return False
        return self._run(tool, "-t", table, "-S", name, check=False, quiet=True, capture=True) == 0

    def _run(self, tool: str, *args: str, check: bool = True, quiet: bool = False, capture: bool = False) -> int:
        if not shutil.which(tool):
            raise RulesError(f"{tool} is not installed (Debian: apt-get install iptables)")
        command = [*self.prefix, tool, "-w", *args]
        if not quiet:
            self.echo("+ " + " ".join(command))
        done = subprocess.run(command, capture_output=True, text=True)
        if check and done.returncode != 0:
            raise RulesError(explain(command, done.stderr))
        return done.returncode


TABLES_OF_CHAINS = (("nat", NAT_CHAIN), ("filter", FILTER_CHAIN))


def explain(command: list[str], stderr: str) -> str:
    why = stderr.strip() or "failed"
    if "ermission denied" in why or "must be root" in why:
        why += " (writing these rules needs root or CAP_NET_ADMIN)"
    return f"{' '.join(command)}: {why}"


def describe_rules(spec: RedirectSpec) -> str:
    """One sentence on what the rules do, printed after they are written."""
    who = "every user" if spec.proxy_uid is None else f"every user but the proxy's (uid {spec.proxy_uid})"
    said = (
        f"agentkeys: outgoing TCP to ports {','.join(map(str, spec.ports))} from {who} now goes to the proxy"
        f" on port {spec.to_port}"
    )
    if spec.drop_others:
        said += "; anything else leaving this namespace but loopback and DNS is refused"
    return said + ("; IPv6 to those ports is refused" if ipv6_enabled() else "")
