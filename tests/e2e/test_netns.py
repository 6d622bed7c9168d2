"""Agents that cannot go around the proxy: the Kubernetes sidecar, and `agentkeys run --isolate`.

Each test runs in network namespaces it makes itself, on loopback addresses only: inside a
namespace the provider hosts resolve to 127.0.1.x (its /etc/hosts), the mock provider and a plain
web site listen on its own loopback, and nothing leaves it. The sidecar tests run the very commands
of deploy/kubernetes/sidecar (the init container's `agentkeys sidecar-init`, then `agentkeys serve`
as the proxy's user), and the agents set no proxy variable and no base URL: the kernel's redirect is
all that sends them to the proxy. Needs root (namespaces, iptables); skipped, saying why, without.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from agentkeys.audit import read_records
from agentkeys.isolate import inside, network_namespace
from conftest import ANTHROPIC_REAL_KEY, OPENAI_REAL_KEY, REPO, write_policy
from k8s_manifests import sidecar
from mock_provider import MockProvider

AGENTKEYS = Path(sys.executable).with_name("agentkeys")
NODE_MODULES = REPO / ".venv" / "node" / "node_modules"  # the pinned Node openai SDK (make install)
PLAIN_SITE = ("127.0.2.1", 80)
ADDRESSES = {"127.0.1.1": "api.openai.com", "127.0.1.2": "api.anthropic.com", PLAIN_SITE[0]: "plain.example"}
# Everything that could point an agent at the proxy: the agents here have none of it.
COOPERATION = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy",
               "OPENAI_BASE_URL", "ANTHROPIC_BASE_URL", "SUDO_UID", "SUDO_GID")  # fmt: skip
AGENT_TIMEOUT = 60


def as_user(uid: int) -> list[str]:
    """Run as `uid`, as the manifest's runAsUser does. It may read anything (CAP_DAC_READ_SEARCH, and no
    other privilege): the interpreter may live in a home folder only root may enter, as pyenv's does here."""
    caps = "+dac_read_search"
    return [
        "setpriv",
        f"--reuid={uid}",
        f"--regid={uid}",
        "--clear-groups",
        f"--inh-caps={caps}",
        f"--ambient-caps={caps}",
        "--",
    ]


PYTHON_AGENT = textwrap.dedent(
    """
    import os, sys, openai
    base_url = sys.argv[1] if len(sys.argv) > 1 else None  # None: the SDK's default or OPENAI_BASE_URL
    try:
        reply = openai.OpenAI(max_retries=0, base_url=base_url).chat.completions.create(
            model="gpt-4o-mini", max_tokens=3, messages=[{"role": "user", "content": "hi"}])
        print("reply:", reply.choices[0].message.content)
    except openai.APIStatusError as e:
        print("status:", e.status_code)
        sys.exit(1)
    """
)
NODE_AGENT = textwrap.dedent(
    """
    const OpenAI = require("openai");
    new OpenAI({ maxRetries: 0 }).chat.completions
      .create({ model: "gpt-4o-mini", max_tokens: 3, messages: [{ role: "user", content: "hi" }] })
      .then((reply) => console.log("reply:", reply.choices[0].message.content))
      .catch((e) => { console.log("status:", e.status); process.exit(1); });
    """
)
RAW_TLS = textwrap.dedent(
    """
    import socket, ssl, sys
    context = ssl.create_default_context(cafile=sys.argv[1])
    with socket.create_connection(("api.openai.com", 443), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname="api.openai.com") as tls:
            issuer = dict(item[0] for item in tls.getpeercert()["issuer"])
            print("peer:", tls.getpeername()[0], "issuer:", issuer["organizationName"])
            tls.sendall(b"GET /v1/models HTTP/1.1\\r\\nHost: api.openai.com\\r\\nConnection: close\\r\\n\\r\\n")
            print("answer:", tls.recv(4096).split(b"\\r\\n")[0].decode())
    """
)
# A TLS connection to a provider whose Host header names another host, through either listener.
HOST_MISMATCH = textwrap.dedent(
    """
    import http.client, ssl, sys
    cafile, listener, proxy_port, host, key = sys.argv[1:]
    context = ssl.create_default_context(cafile=cafile)
    if listener == "proxy":
        connection = http.client.HTTPSConnection("127.0.0.1", int(proxy_port), context=context, timeout=10)
        connection.set_tunnel("api.openai.com", 443)
    else:
        connection = http.client.HTTPSConnection("api.openai.com", 443, context=context, timeout=10)
    connection.putrequest("GET", "/v1/models", skip_host=True)
    connection.putheader("Host", host)
    connection.putheader("Authorization", "Bearer " + key)
    connection.endheaders()
    print("answer:", connection.getresponse().status)
    """
)
PLAIN_GET = "import urllib.request as u; print(u.urlopen('http://plain.example/', timeout=10).read().decode())"


def why_not_here() -> str | None:
    if os.geteuid() != 0:
        return "needs root to make network namespaces and write iptables rules"
    for tool in ("ip", "iptables", "setpriv"):
        if not shutil.which(tool):
            return f"needs {tool} (make install installs iptables; iproute2 and util-linux are Debian's defaults)"
    probe = f"agentkeys-probe-{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    if made.returncode != 0:
        return f"cannot make a network namespace here: {made.stderr.strip()}"
    return None


@pytest.fixture(scope="module", autouse=True)
def _namespaces_possible():
    reason = why_not_here()
    if reason:
        pytest.skip(reason)


class PlainSite(ThreadingHTTPServer):
    """A web site that is not a provider, on plain HTTP; counts its visitors."""

    def __init__(self):
        self.visits = 0

        class Handler(BaseHTTPRequestHandler):
            def do_GET(handler):
                self.visits += 1
                body = b"plain.example says hi"
                handler.send_response(200)
                handler.send_header("content-length", str(len(body)))
                handler.end_headers()
                handler.wfile.write(body)

            def log_message(self, *args):
                pass

        super().__init__(PLAIN_SITE, Handler)
        threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True).start()


@dataclass
class Pod:
    """A network namespace set up as deploy/kubernetes/sidecar sets up a pod."""

    namespace: str
    dir: Path
    config: Path
    proxy_uid: int
    mock: MockProvider
    site: PlainSite
    process: subprocess.Popen

    def as_proxy_user(self, *command: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [*as_user(self.proxy_uid), *command],
            capture_output=True, text=True, check=True, cwd=self.dir, env={**os.environ, "HOME": str(self.dir)},
        )  # fmt: skip

    def issue(self) -> dict:
        policy = write_policy(self.dir)
        os.chown(policy, self.proxy_uid, self.proxy_uid)
        issued = self.as_proxy_user(
            str(AGENTKEYS), "--config", str(self.config), "keys", "issue", str(policy), "--json"
        )
        return json.loads(issued.stdout)

    def agent(self, *command: str, **env: str) -> subprocess.CompletedProcess:
        """Run an agent in the pod's namespace as root (not the proxy's user: it is redirected)."""
        clean = {k: v for k, v in os.environ.items() if k not in COOPERATION}
        return subprocess.run(
            ["ip", "netns", "exec", self.namespace, *command],
            env={**clean, **env}, capture_output=True, text=True, timeout=AGENT_TIMEOUT,
        )  # fmt: skip

    def trust(self) -> dict[str, str]:
        """The CA variables the sidecar manifest gives the agent, and nothing more."""
        certs = self.dir / "certs"
        bundle = str(certs / "agentkeys-ca-bundle.pem")
        return {
            "SSL_CERT_FILE": bundle,
            "REQUESTS_CA_BUNDLE": bundle,
            "NODE_EXTRA_CA_CERTS": str(certs / "mitmproxy-ca-cert.pem"),
        }

    def records(self, key_id: str | None, count: int = 1) -> list[dict]:
        deadline = time.monotonic() + 10
        while True:
            found = [r for r in read_records(self.dir / "audit.jsonl") if r["key_id"] == key_id]
            if len(found) >= count or time.monotonic() > deadline:
                return found
            time.sleep(0.05)


@contextmanager
def sidecar_pod(egress: str):
    """A namespace with the mock provider and a plain site in it, the sidecar's rules, and its proxy."""
    manifest = sidecar()
    with network_namespace(ADDRESSES) as namespace:
        with inside(namespace):
            mock = MockProvider(openai_key=OPENAI_REAL_KEY, anthropic_key=ANTHROPIC_REAL_KEY).start()
            site = PlainSite()
        folder = Path(tempfile.mkdtemp(prefix="agentkeys-pod-"))  # not under pytest's root-only folder
        try:
            pod = start_sidecar(namespace, folder, manifest, mock, site, egress)
            yield pod
            stop(pod.process)
            log = (folder / "proxy.log").read_text()
            assert OPENAI_REAL_KEY not in log and "Traceback" not in log, log
        finally:
            mock.stop()
            site.shutdown()
            site.server_close()
            shutil.rmtree(folder, ignore_errors=True)


def start_sidecar(namespace, folder, manifest, mock, site, egress) -> Pod:
    """The pod's start-up, in the manifest's order: the init container's rules, then the proxy."""
    config = {
        **manifest.config,  # its listeners and transparent_port; the store, paths and upstreams are the test's
        "store": "sqlite:///agentkeys.db", "audit_log": "audit.jsonl", "certs_dir": "certs", "egress": egress,
        "providers": {"openai": {"upstream": mock.url}, "anthropic": {"upstream": mock.url}},
    }  # fmt: skip
    config_path = folder / "agentkeys.yaml"
    config_path.write_text(yaml.safe_dump(config))
    os.chown(folder, manifest.proxy_uid, manifest.proxy_uid)
    os.chown(config_path, manifest.proxy_uid, manifest.proxy_uid)
    init = subprocess.run(
        ["ip", "netns", "exec", namespace, str(AGENTKEYS), *manifest.init_command[1:]],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert f"now goes to the proxy on port {config['transparent_port']}" in init.stdout, init
    env = {**os.environ, "AGENTKEYS_CONFIG": str(config_path), "HOME": str(folder),
           "OPENAI_API_KEY": OPENAI_REAL_KEY, "ANTHROPIC_API_KEY": ANTHROPIC_REAL_KEY}  # fmt: skip
    process = subprocess.Popen(
        ["ip", "netns", "exec", namespace, *as_user(manifest.proxy_uid), str(AGENTKEYS), *manifest.proxy_command[1:]],
        cwd=folder, env=env, stdout=open(folder / "proxy.log", "w"), stderr=subprocess.STDOUT,
    )  # fmt: skip
    pod = Pod(namespace, folder, config_path, manifest.proxy_uid, mock, site, process)
    wait_for_listener(pod, config["transparent_port"])
    return pod


def wait_for_listener(pod: Pod, port: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert pod.process.poll() is None, (pod.dir / "proxy.log").read_text()
        with inside(pod.namespace):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                return
            except OSError:
                pass
        time.sleep(0.1)
    raise AssertionError(f"the proxy did not listen on {port}:\n{(pod.dir / 'proxy.log').read_text()}")


def stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()


@pytest.fixture(scope="module")
def pod():
    with sidecar_pod(egress="passthrough") as running:
        yield running


@pytest.fixture(autouse=True)
def _reset(request):
    if "pod" in request.fixturenames:
        pod = request.getfixturevalue("pod")
        pod.mock.reset()
        pod.site.visits = 0


def agent_command(sdk: str, folder: Path) -> tuple[list[str], dict[str, str]]:
    if sdk == "python":
        script = folder / "agent.py"
        script.write_text(PYTHON_AGENT)
        return [sys.executable, str(script)], {}
    if not (NODE_MODULES / "openai").is_dir() or not shutil.which("node"):
        pytest.skip(f"the Node openai SDK is not installed in {NODE_MODULES} (make install does it, with npm)")
    script = folder / "agent.cjs"
    script.write_text(NODE_AGENT)
    return ["node", str(script)], {"NODE_PATH": str(NODE_MODULES)}


@pytest.mark.parametrize("sdk", ["python", "node"])
def test_an_sdk_with_a_scoped_key_is_metered_and_audited(pod, sdk, tmp_path):
    key = pod.issue()
    command, env = agent_command(sdk, tmp_path)
    done = pod.agent(*command, OPENAI_API_KEY=key["key"], **pod.trust(), **env)
    assert done.returncode == 0, done.stderr
    assert "reply: hello hello hello" in done.stdout
    [received] = pod.mock.received
    assert received.headers["authorization"] == f"Bearer {OPENAI_REAL_KEY}"
    [record] = pod.records(key["id"])
    assert (record["decision"], record["metering"], record["provider"]) == ("allow", "usage", "openai")
    assert record["cost_micros"] > 0 and record["output_tokens"] == 3


@pytest.mark.parametrize("sdk", ["python", "node"])
def test_an_sdk_with_a_real_key_is_refused_and_nothing_reaches_the_provider(pod, sdk, tmp_path):
    command, env = agent_command(sdk, tmp_path)
    done = pod.agent(*command, OPENAI_API_KEY=OPENAI_REAL_KEY, **pod.trust(), **env)
    assert done.returncode == 1 and "status: 401" in done.stdout, (done.stdout, done.stderr)
    assert pod.mock.received == []
    [record] = [r for r in pod.records(None) if r["provider"] == "openai"][-1:]
    assert record["decision"] == "deny" and record["status"] == 401


def test_a_raw_tls_connection_to_the_providers_address_is_intercepted(pod, tmp_path):
    script = tmp_path / "raw_tls.py"
    script.write_text(RAW_TLS)
    done = pod.agent(sys.executable, str(script), pod.trust()["SSL_CERT_FILE"])
    assert done.returncode == 0, done.stderr
    assert "peer: 127.0.1.1 issuer: mitmproxy" in done.stdout  # dialled the provider's address; our CA answered
    assert "answer: HTTP/1.1 401" in done.stdout
    assert pod.mock.received == []


@pytest.mark.parametrize("listener", ["transparent", "proxy"])
def test_a_host_header_naming_another_host_does_not_take_a_call_past_the_gate(pod, listener, tmp_path):
    """A TLS connection to the provider whose Host header names another host is refused (400), not
    routed by the header past the gate: nothing reaches the provider or the other host."""
    script = tmp_path / "host_mismatch.py"
    script.write_text(HOST_MISMATCH)
    proxy_port = str(sidecar().config["proxy_port"])
    done = pod.agent(sys.executable, str(script), pod.trust()["SSL_CERT_FILE"], listener, proxy_port,
                     "plain.example", OPENAI_REAL_KEY)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "answer: 400" in done.stdout
    assert pod.mock.received == [] and pod.site.visits == 0


def test_a_non_provider_host_passes_through_with_egress_passthrough(pod):
    done = pod.agent(sys.executable, "-c", PLAIN_GET)
    assert done.returncode == 0, done.stderr
    assert "plain.example says hi" in done.stdout and pod.site.visits == 1
    assert pod.mock.received == []


def test_a_non_provider_host_is_refused_and_audited_with_egress_allowlist(tmp_path):
    """Plain HTTP, and TLS too: the proxy intercepts a non-provider's TLS to answer its requests 403."""
    script = tmp_path / "tls_get.py"
    script.write_text(PLAIN_GET.replace("http://plain.example/", "https://plain.example/"))
    with sidecar_pod(egress="allowlist") as pod:
        for command in (["-c", PLAIN_GET], ["-c", script.read_text()]):
            done = pod.agent(sys.executable, *command, **pod.trust())
            assert done.returncode == 1 and "HTTP Error 403: Forbidden" in done.stderr, done.stderr
        assert pod.site.visits == 0
        records = pod.records(None, count=2)
        assert [(r["decision"], r["status"], r["reason"]) for r in records] == 2 * [
            ("deny", 403, "egress to plain.example is not allowed")
        ]


# A connection to a port that is not redirected, on a host outside the pod: that host is a second
# namespace the test makes, joined to the pod by a veth pair on TEST-NET-1 addresses (never routed).
OUTSIDE = ("192.0.2.2", 8443)
DIAL = "import socket, sys; socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5).close(); print('open')"


@contextmanager
def outside_host(pod: Pod):
    """A namespace beside the pod's, reachable from it at OUTSIDE, with a listener there."""
    suffix = pod.namespace.rsplit("-", 1)[1]
    inner, outer = f"akin{suffix}", f"akout{suffix}"
    with network_namespace({}) as outside:
        subprocess.run(["ip", "link", "add", inner, "netns", pod.namespace, "type", "veth", "peer", outer,
                        "netns", outside], check=True)  # fmt: skip
        for namespace, link, address in ((pod.namespace, inner, "192.0.2.1/24"), (outside, outer, "192.0.2.2/24")):
            subprocess.run(["ip", "-n", namespace, "addr", "add", address, "dev", link], check=True)
            subprocess.run(["ip", "-n", namespace, "link", "set", link, "up"], check=True)
        with inside(outside):
            listener = socket.create_server(OUTSIDE)
        try:
            yield
        finally:
            listener.close()
            subprocess.run(["ip", "-n", pod.namespace, "link", "del", inner], capture_output=True)


def test_drop_others_leaves_the_agent_no_other_port_but_spares_the_proxy(pod):
    dial = [sys.executable, "-c", DIAL, *map(str, OUTSIDE)]
    with outside_host(pod):
        agent = pod.agent(*dial)
        assert agent.returncode == 1 and "ConnectionRefusedError" in agent.stderr, agent.stderr
        proxy_user = subprocess.run(
            ["ip", "netns", "exec", pod.namespace, *as_user(pod.proxy_uid), *dial],
            capture_output=True, text=True, timeout=AGENT_TIMEOUT,
        )  # fmt: skip
        assert proxy_user.stdout.strip() == "open", proxy_user.stderr


def rules_in(namespace: str) -> str:
    saved = [subprocess.run(["ip", "netns", "exec", namespace, tool], capture_output=True, text=True, check=True)
             for tool in ("iptables-save", "ip6tables-save")]  # fmt: skip
    return "".join(done.stdout for done in saved)


def test_sidecar_init_is_idempotent_and_removes_what_it_wrote():
    init = [str(AGENTKEYS), *sidecar().init_command[1:]]
    with network_namespace({}) as namespace:
        before = rules_in(namespace)
        for _ in range(2):
            subprocess.run(["ip", "netns", "exec", namespace, *init], check=True, capture_output=True)
        written = rules_in(namespace)
        assert written.count("-A OUTPUT -j AGENTKEYS_REDIRECT") == 1
        assert written.count("--to-ports 15001") == 1
        removed = subprocess.run(
            ["ip", "netns", "exec", namespace, str(AGENTKEYS), "sidecar-init", "--remove"],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        assert "removed" in removed.stdout
        assert "AGENTKEYS" not in rules_in(namespace) and rules_in(namespace).count("-A") == before.count("-A")


def test_sidecar_init_without_the_proxys_uid_is_refused():
    done = subprocess.run([str(AGENTKEYS), "sidecar-init", "--to-port", "15001"], capture_output=True, text=True)
    assert done.returncode == 1 and "--proxy-uid" in done.stderr


# ----- agentkeys run --isolate -----

ISOLATED_AGENT = textwrap.dedent(
    """
    import os, subprocess, sys
    assert "HTTPS_PROXY" not in os.environ
    escape = subprocess.run(["nsenter", "--net=/proc/1/ns/net", "true"], capture_output=True)
    print("escaped" if escape.returncode == 0 else "could not leave the namespace")
    """
)


def run_isolated(proxy, policy: Path, *command: str, **popen) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in COOPERATION}
    env.update(OPENAI_API_KEY=OPENAI_REAL_KEY, ANTHROPIC_API_KEY=ANTHROPIC_REAL_KEY)
    return subprocess.run(
        [str(AGENTKEYS), "--config", str(proxy.config_path), "run", "--isolate", "--policy", str(policy),
         "--budget", "0.5", "--", *command],
        capture_output=True, text=True, env=env, timeout=AGENT_TIMEOUT * 2, **popen,
    )  # fmt: skip


def key_of(proxy, run: subprocess.CompletedProcess) -> dict:
    """The key `agentkeys run` minted, by the id it printed."""
    key_id = run.stderr.split("agentkeys: key ", 1)[1].split()[0]
    [key] = [key for key in keys(proxy) if key["id"] == key_id]
    return key


def keys(proxy) -> list[dict]:
    listing = subprocess.run([str(AGENTKEYS), "--config", str(proxy.config_path), "keys", "list", "--json"],
                             capture_output=True, text=True, check=True)  # fmt: skip
    return json.loads(listing.stdout)


def test_run_isolate_governs_an_agent_that_dials_the_provider_itself(proxy, mock, tmp_path):
    """The agent names https://api.openai.com itself, ignoring every variable: the namespace has no
    other way out than the proxy, and it cannot leave the namespace."""
    agent = tmp_path / "agent.py"
    agent.write_text(PYTHON_AGENT + ISOLATED_AGENT + "sys.exit(7)\n")
    done = run_isolated(proxy, write_policy(tmp_path), sys.executable, str(agent), "https://api.openai.com/v1")
    assert done.returncode == 7, done.stderr
    assert "reply: hello hello hello" in done.stdout
    assert "could not leave the namespace" in done.stdout
    assert mock.received[-1].headers["authorization"] == f"Bearer {OPENAI_REAL_KEY}"
    key = key_of(proxy, done)
    assert key["status"] == "revoked" and key["spent_usd"] > 0
    [record] = proxy.records_for(key["id"])
    assert record["metering"] == "usage"
    namespace = done.stderr.split("running in network namespace ", 1)[1].split(";")[0]
    assert not Path("/run/netns", namespace).exists() and not Path("/etc/netns", namespace).exists()


def test_run_isolate_relays_the_gateway_for_base_url_sdks(proxy, mock, tmp_path):
    command, env = agent_command("node", tmp_path)
    done = run_isolated(proxy, write_policy(tmp_path), "env", f"NODE_PATH={env['NODE_PATH']}", *command)
    assert done.returncode == 0, done.stderr
    assert "reply: hello hello hello" in done.stdout
    assert mock.received[-1].headers["authorization"] == f"Bearer {OPENAI_REAL_KEY}"
    assert key_of(proxy, done)["status"] == "revoked"


def test_run_isolate_without_the_privileges_runs_nothing(proxy, tmp_path):
    """Root without its capabilities, as in a container that was not given NET_ADMIN."""
    marker = tmp_path / "ran"
    before = keys(proxy)
    done = subprocess.run(
        ["setpriv", "--inh-caps=-all", "--bounding-set=-all", "--", str(AGENTKEYS), "--config", str(proxy.config_path),
         "run", "--isolate", "--policy", str(write_policy(tmp_path)), "--", "touch", str(marker)],
        capture_output=True, text=True, timeout=AGENT_TIMEOUT,
    )  # fmt: skip
    assert done.returncode == 1
    assert "needs root, or CAP_NET_ADMIN and CAP_SYS_ADMIN" in done.stderr and "not run" in done.stderr
    assert not marker.exists()
    assert keys(proxy) == before, "no key is minted for a command that cannot be isolated"
