"""`agentkeys run`: a fresh key per command, revoked however the command ends."""

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from conftest import ANTHROPIC_REAL_KEY, OPENAI_REAL_KEY, REPO, free_port, write_policy

AGENTKEYS = Path(sys.executable).with_name("agentkeys")

# An unchanged agent: the openai SDK configured only by its environment.
AGENT = textwrap.dedent(
    """
    import os, sys, time
    import openai
    assert not os.environ["OPENAI_API_KEY"].startswith("sk-"), "the real key leaked into the agent"
    reply = openai.OpenAI(max_retries=0).chat.completions.create(
        model="gpt-4o-mini", max_tokens=3, messages=[{"role": "user", "content": "hi"}])
    print("agent got:", reply.choices[0].message.content, flush=True)
    if sys.argv[1] == "wait":
        time.sleep(60)
    sys.exit(int(sys.argv[1]) if sys.argv[1] != "wait" else 0)
    """
)


@pytest.fixture()
def agent(tmp_path):
    path = tmp_path / "agent.py"
    path.write_text(AGENT)
    return path


def env_with_real_keys():
    env = {**os.environ, "OPENAI_API_KEY": OPENAI_REAL_KEY, "ANTHROPIC_API_KEY": ANTHROPIC_REAL_KEY}
    env.pop("HTTPS_PROXY", None)
    return env


def run_agent(config: Path, policy: Path, *command: str, **popen) -> subprocess.Popen:
    return subprocess.Popen(
        [str(AGENTKEYS), "--config", str(config), "run", "--policy", str(policy), "--budget", "0.5", "--", *command],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env_with_real_keys(), **popen,
    )  # fmt: skip


def keys_of(config: Path) -> list[dict]:
    listing = subprocess.run(
        [str(AGENTKEYS), "--config", str(config), "keys", "list", "--json"], capture_output=True, text=True, check=True
    )
    return json.loads(listing.stdout)


def only_key(config: Path) -> dict:
    [key] = keys_of(config)
    return key


def test_run_passes_the_exit_status_and_revokes_the_key(proxy, mock, agent, tmp_path):
    finished = run_agent(proxy.config_path, write_policy(tmp_path), sys.executable, str(agent), "3")
    stdout, stderr = finished.communicate(timeout=60)
    assert finished.returncode == 3, stderr
    assert "agent got: hello hello hello" in stdout
    assert mock.received[-1].headers["authorization"] == f"Bearer {OPENAI_REAL_KEY}"
    key = only_key(proxy.config_path)
    assert key["status"] == "revoked" and key["spent_usd"] > 0
    assert f"key {key['id']} revoked; 1 calls" in stderr
    assert "gpt-4o-mini: 1 calls" in stderr


def interruptible():
    """Ctrl-C as at a terminal: a background job (a CI runner's, `make test &`) starts with SIGINT
    ignored, and the agent would inherit that and sleep through the interrupt passed on to it."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_run_revokes_the_key_on_ctrl_c(proxy, agent, tmp_path):
    running = run_agent(
        proxy.config_path, write_policy(tmp_path), sys.executable, str(agent), "wait", preexec_fn=interruptible
    )
    assert "agent got:" in running.stdout.readline()
    running.send_signal(signal.SIGINT)
    _, stderr = running.communicate(timeout=30)
    assert running.returncode == 130
    assert all(key["status"] == "revoked" for key in keys_of(proxy.config_path)), "a key outlived its command"
    assert "revoked" in stderr


def test_run_starts_a_proxy_when_none_is_running(mock, agent, tmp_path):
    config = tmp_path / "agentkeys.yaml"
    proxy_port, gateway_port = free_port(), free_port()
    config.write_text(
        yaml.safe_dump(
            {
                "proxy_port": proxy_port,
                "gateway_port": gateway_port,
                "metrics_port": 0,
                "providers": {"openai": {"upstream": mock.url}, "anthropic": {"upstream": mock.url}},
            }
        )
    )
    finished = run_agent(config, write_policy(tmp_path), sys.executable, str(agent), "0")
    stdout, stderr = finished.communicate(timeout=90)
    assert finished.returncode == 0, stderr
    assert "started a proxy" in stderr and "agent got: hello hello hello" in stdout
    assert only_key(config)["status"] == "revoked"
    time.sleep(0.5)
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", proxy_port), timeout=1).close()


NODE_MODULES = REPO / ".venv" / "node" / "node_modules"  # make install's
# A Node agent: Node's fetch ignores HTTPS_PROXY, so only a base URL brings it to the proxy. It stops
# rather than call the real provider when it has none.
NODE_AGENT = textwrap.dedent(
    """
    const OpenAI = require("openai");
    if (!process.env.OPENAI_BASE_URL) { console.log("no OPENAI_BASE_URL"); process.exit(3); }
    console.log("anthropic:", process.env.ANTHROPIC_BASE_URL);
    new OpenAI({ maxRetries: 0 }).chat.completions
      .create({ model: "gpt-4o-mini", max_tokens: 3, messages: [{ role: "user", content: "hi" }] })
      .then((reply) => console.log("agent got:", reply.choices[0].message.content));
    """
)


def test_run_points_node_sdks_at_the_gateway(proxy, mock, tmp_path):
    if not (NODE_MODULES / "openai").is_dir():
        pytest.skip(f"the Node openai SDK is not installed in {NODE_MODULES} (make install does it, with npm)")
    agent = tmp_path / "agent.cjs"
    agent.write_text(NODE_AGENT)
    finished = run_agent(
        proxy.config_path, write_policy(tmp_path), "env", f"NODE_PATH={NODE_MODULES}", "node", str(agent)
    )
    stdout, stderr = finished.communicate(timeout=60)
    assert finished.returncode == 0, stdout + stderr
    assert "agent got: hello hello hello" in stdout
    assert f"anthropic: {proxy.gateway_url}/anthropic" in stdout
    assert mock.received[-1].headers["authorization"] == f"Bearer {OPENAI_REAL_KEY}"
    key_id = stderr.split("agentkeys: key ", 1)[1].split()[0]
    [record] = proxy.records_for(key_id)
    assert record["metering"] == "usage" and record["cost_micros"] > 0


def test_run_counts_refused_calls_apart_not_as_a_model(proxy, tmp_path):
    agent = tmp_path / "refused_agent.py"
    agent.write_text(
        textwrap.dedent(
            """
            import openai
            hi = [{"role": "user", "content": "hi"}]
            client = openai.OpenAI(max_retries=0)
            client.chat.completions.create(model="gpt-4o-mini", max_tokens=3, messages=hi)
            for model in ("gpt-4o", "o3"):  # not in the policy
                try:
                    client.chat.completions.create(model=model, max_tokens=3, messages=hi)
                except openai.PermissionDeniedError:
                    pass
            """
        )
    )
    finished = run_agent(proxy.config_path, write_policy(tmp_path), sys.executable, str(agent))
    _, stderr = finished.communicate(timeout=60)
    assert finished.returncode == 0, stderr
    assert "3 calls" in stderr and "gpt-4o-mini: 1 calls" in stderr
    assert "refused by the proxy: 2 calls (2 × 403)" in stderr
    assert "  -:" not in stderr and "gpt-4o:" not in stderr, stderr
