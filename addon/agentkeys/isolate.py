"""`agentkeys run --isolate`: the command in a network namespace whose only way out is the proxy.

The namespace has a loopback interface and nothing else, so no address outside it can be reached.
Inside it, each provider host resolves to a loopback address of its own (`/etc/netns/NAME/hosts`,
which `ip netns exec` puts in place of /etc/hosts; other names do not resolve at all), and
`sidecar-init`'s rules redirect every connection to ports 80 and 443 to a relay listening in the
namespace. The relay, running in this process, reads each connection's original destination, names
its host from that table and opens a `CONNECT host:port` through the proxy's ordinary (HTTPS_PROXY)
listener outside: from there the proxy treats it as any proxied connection (provider hosts
intercepted and governed, anything else per `egress`). The gateway is relayed into the namespace on
its own port, so the SDKs' base-URL variables work there too.

The command runs without any capability (and as the user who ran sudo, if one did), so it can
neither leave the namespace nor change its rules. Creating the namespace needs root, or
CAP_NET_ADMIN with CAP_SYS_ADMIN; without them nothing is run.
"""

import asyncio
import contextlib
import ctypes
import ipaddress
import os
import shutil
import socket
import subprocess
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from agentkeys.netrules import DEFAULT_PORTS, RedirectSpec, Rules

NETNS_DIR = Path("/run/netns")
NETNS_ETC = Path("/etc/netns")
RELAY_PORT = 15001  # in the namespace's own port space, where nothing else listens
FIRST_PROVIDER_ADDRESS = ipaddress.ip_address("127.0.1.1")
CAP_NET_ADMIN, CAP_SYS_ADMIN = 12, 21
CONNECT_REPLY_LIMIT = 64 * 1024


class IsolationError(Exception):
    """The namespace could not be made: the command must not run ungoverned."""


def check_privileges() -> None:
    if has_capabilities(CAP_NET_ADMIN, CAP_SYS_ADMIN):  # root has them, unless a container took them away
        for tool in ("ip", "iptables", "setpriv"):
            if not shutil.which(tool):
                raise IsolationError(f"--isolate needs {tool} (Debian: apt-get install iproute2 iptables util-linux)")
        return
    raise IsolationError(
        "--isolate needs root, or CAP_NET_ADMIN and CAP_SYS_ADMIN, to make a network namespace"
        " (try sudo; the command then runs as you, without privileges); the command was not run"
    )


def has_capabilities(*bits: int) -> bool:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("CapEff:"):
            effective = int(line.split()[1], 16)
            return all(effective >> bit & 1 for bit in bits)
    return False


def provider_addresses(hosts: list[str]) -> dict[str, str]:
    """Each host its own loopback address in the namespace, so the relay can tell them apart."""
    return {str(FIRST_PROVIDER_ADDRESS + i): host for i, host in enumerate(dict.fromkeys(hosts))}


@contextmanager
def network_namespace(addresses: dict[str, str]) -> Iterator[str]:
    """A fresh namespace with only loopback, its hosts file naming the providers; removed afterwards."""
    name = f"agentkeys-{uuid.uuid4().hex[:8]}"
    etc = NETNS_ETC / name
    try:
        run("ip", "netns", "add", name)
        run("ip", "-n", name, "link", "set", "lo", "up")
        etc.mkdir(parents=True)
        lines = ["127.0.0.1 localhost", "::1 localhost", *(f"{ip} {host}" for ip, host in addresses.items())]
        (etc / "hosts").write_text("\n".join(lines) + "\n")
        (etc / "resolv.conf").write_text("nameserver 127.0.0.1\n")  # nothing answers: other names do not resolve
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)
        shutil.rmtree(etc, ignore_errors=True)


def run(*command: str) -> None:
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise IsolationError(f"{' '.join(command)}: {done.stderr.strip() or 'failed'}")


@contextmanager
def inside(namespace: str) -> Iterator[None]:
    """This thread in `namespace` (sockets made meanwhile belong to it, and stay there), then back."""
    with open("/proc/thread-self/ns/net") as home, open(NETNS_DIR / namespace) as target:
        setns(target.fileno())
        try:
            yield
        finally:
            setns(home.fileno())


def setns(fd: int) -> None:
    if hasattr(os, "setns"):  # Python 3.12+
        os.setns(fd, os.CLONE_NEWNET)
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, 0x40000000) != 0:  # CLONE_NEWNET
        raise OSError(ctypes.get_errno(), "setns failed")


def command_in(namespace: str, command: list[str]) -> list[str]:
    """`command` run in the namespace with no capability, as the user who ran sudo if one did."""
    drop = ["setpriv", "--no-new-privs", "--inh-caps=-all", "--ambient-caps=-all", "--bounding-set=-all"]
    if os.environ.get("SUDO_UID") and os.environ.get("SUDO_GID"):
        drop += ["--reuid", os.environ["SUDO_UID"], "--regid", os.environ["SUDO_GID"], "--init-groups"]
    return ["ip", "netns", "exec", namespace, *drop, "--", *command]


@dataclass(frozen=True)
class Endpoint:
    host: str
    port: int

    @classmethod
    def of(cls, url: str) -> "Endpoint":
        parts = urlsplit(url)
        return cls(parts.hostname, parts.port or 80)


class Relay:
    """In the namespace: redirected connections become CONNECTs through the proxy; the gateway port is
    passed through to the gateway. Runs on an event loop of its own in a background thread."""

    def __init__(self, namespace: str, addresses: dict[str, str], proxy: Endpoint, gateway: Endpoint):
        self.addresses, self.proxy, self.gateway = addresses, proxy, gateway
        with inside(namespace):
            self._redirected = listening_socket(RELAY_PORT)
            self._gateway = listening_socket(gateway.port)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="agentkeys-relay", daemon=True)

    def __enter__(self) -> "Relay":
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._serve(), self._loop).result(timeout=10)
        return self

    def __exit__(self, *exc):
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        self._redirected.close()
        self._gateway.close()

    async def _serve(self):
        await asyncio.start_server(self._connect_through_proxy, sock=self._redirected)
        await asyncio.start_server(self._to_gateway, sock=self._gateway)

    async def _connect_through_proxy(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        from mitmproxy.platform.linux import original_addr

        with contextlib.closing(writer):
            ip, port = original_addr(writer.get_extra_info("socket"))
            host = self.addresses.get(ip, ip)
            up_reader, up_writer = await asyncio.open_connection(self.proxy.host, self.proxy.port)
            with contextlib.closing(up_writer):
                up_writer.write(f"CONNECT {host}:{port} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode())
                head = await up_reader.readuntil(b"\r\n\r\n")
                if head.split(b" ", 2)[1:2] != [b"200"]:  # refused (egress): the agent sees the proxy's answer
                    writer.write(head + await up_reader.read(CONNECT_REPLY_LIMIT))
                    await writer.drain()
                    return
                await splice(reader, writer, up_reader, up_writer)

    async def _to_gateway(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        with contextlib.closing(writer):
            up_reader, up_writer = await asyncio.open_connection(self.gateway.host, self.gateway.port)
            with contextlib.closing(up_writer):
                await splice(reader, writer, up_reader, up_writer)


def listening_socket(port: int) -> socket.socket:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen(128)
    sock.setblocking(False)
    return sock


async def splice(a_reader, a_writer, b_reader, b_writer) -> None:
    """Copy both ways until both sides are done."""

    async def copy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
            if writer.can_write_eof():
                writer.write_eof()
        except (ConnectionError, OSError):
            writer.close()

    await asyncio.gather(copy(a_reader, b_writer), copy(b_reader, a_writer))


@contextmanager
def isolated(hosts: list[str], proxy_url: str, gateway_url: str) -> Iterator[str]:
    """A namespace whose only way out is the proxy, for as long as the block runs; its name."""
    check_privileges()
    addresses = provider_addresses(hosts)
    with network_namespace(addresses) as namespace:
        Rules(prefix=("ip", "netns", "exec", namespace), echo=lambda _line: None).apply(
            RedirectSpec(to_port=RELAY_PORT, ports=DEFAULT_PORTS)
        )
        with Relay(namespace, addresses, Endpoint.of(proxy_url), Endpoint.of(gateway_url)):
            yield namespace
