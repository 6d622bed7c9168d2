"""The container image, run as a team would run it: `make image-test` (after `make image`).

Skipped unless AGENTKEYS_IMAGE names a built image: building one takes minutes and podman, so it is
no part of `make test`. The container shares the host's network (so it reaches the mock provider on
127.0.0.1 and every port stays on 127.0.0.1), its config is a mounted file, its state a named volume.
"""

import json
import os
import subprocess
import time
import uuid

import openai
import pytest
import yaml

from conftest import OPENAI_REAL_KEY, REPO, free_port, httpx, write_policy

IMAGE = os.environ.get("AGENTKEYS_IMAGE")
pytestmark = pytest.mark.skipif(not IMAGE, reason="set AGENTKEYS_IMAGE (make image-test) to test a built image")


def podman_flags() -> list[str]:
    """What this machine needs podman told (scripts/podman-flags)."""
    printed = subprocess.run(
        ["bash", "-c", 'source scripts/podman-flags; printf "%s\\n" "${PODMAN_FLAGS[@]}"'],
        cwd=REPO, capture_output=True, text=True, check=True,
    )  # fmt: skip
    return printed.stdout.split()


def podman(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["podman", *args], capture_output=True, text=True, timeout=timeout, check=check)


@pytest.fixture(scope="module")
def container(mock, tmp_path_factory):
    """The image serving a mounted config with the state in a fresh volume; removed, volume too, afterwards."""
    folder = tmp_path_factory.mktemp("image")
    ports = {"proxy_port": free_port(), "gateway_port": free_port(), "metrics_port": free_port()}
    config = folder / "agentkeys.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                **ports,
                "listen_host": "127.0.0.1",
                "store": "sqlite:////var/lib/agentkeys/agentkeys.db",
                "audit_log": "/var/lib/agentkeys/audit.jsonl",
                "certs_dir": "/var/lib/agentkeys/certs",
                "log_format": "json",
                "providers": {"openai": {"upstream": mock.url}, "anthropic": {"upstream": mock.url}},
            }
        )
    )
    write_policy(folder, "ci")
    config.chmod(0o644)
    name = f"agentkeys-test-{uuid.uuid4().hex[:8]}"
    podman(
        "run", "--detach", "--name", name, *podman_flags(), "--network", "host",
        "--volume", f"{name}:/var/lib/agentkeys",
        "--volume", f"{config}:/etc/agentkeys/agentkeys.yaml:ro",
        "--volume", f"{folder / 'ci.policy.yaml'}:/etc/agentkeys/policies/ci.policy.yaml:ro",
        "--env", f"OPENAI_API_KEY={OPENAI_REAL_KEY}",
        IMAGE,
    )  # fmt: skip
    try:
        yield name, ports
    finally:
        podman("rm", "--force", "--time", "10", name, check=False)
        podman("volume", "rm", "--force", name, check=False)


def wait_ready(port: int, timeout: float = 90) -> httpx.Response:
    deadline = time.monotonic() + timeout
    while True:
        try:
            answer = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=5)
            if answer.status_code == 200:
                return answer
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"not ready within {timeout}s")
        time.sleep(0.5)


def test_the_image_serves_from_a_mounted_config_as_a_non_root_user(container, mock):
    name, ports = container
    ready = wait_ready(ports["metrics_port"])
    assert ready.json()["checks"] == {"listeners": "ok", "ca": "ok", "store": "ok"}
    assert httpx.get(f"http://127.0.0.1:{ports['metrics_port']}/nothing", timeout=5).status_code == 404
    assert podman("exec", name, "id", "-u").stdout.strip() == "10001"

    issued = podman("exec", name, "agentkeys", "keys", "issue", "/etc/agentkeys/policies/ci.policy.yaml", "--json")
    key = json.loads(issued.stdout)
    client = openai.OpenAI(
        api_key=key["key"], base_url=f"http://127.0.0.1:{ports['gateway_port']}/openai/v1", max_retries=0
    )
    reply = client.chat.completions.create(
        model="gpt-4o-mini", max_tokens=5, messages=[{"role": "user", "content": "hi"}]
    )
    assert reply.choices[0].message.content
    assert mock.received[-1].headers["authorization"] == f"Bearer {OPENAI_REAL_KEY}"

    deadline = time.monotonic() + 10
    while key["id"] not in podman("exec", name, "cat", "/var/lib/agentkeys/audit.jsonl").stdout:
        assert time.monotonic() < deadline, "no audit record in the volume"
        time.sleep(0.2)
    assert podman("healthcheck", "run", name, check=False).returncode == 0, "the image's HEALTHCHECK failed"


def test_the_image_logs_json_lines_and_holds_only_the_package(container):
    name, ports = container
    wait_ready(ports["metrics_port"])
    lines = podman("logs", name).stdout.splitlines() + podman("logs", name).stderr.splitlines()
    objects = [json.loads(line) for line in lines if line.strip()]
    assert objects and all(set(o) == {"time", "level", "message", "fields"} for o in objects)
    assert objects[0]["fields"]["command"] == "/opt/agentkeys/bin/agentkeys"
    listing = podman("run", "--rm", *podman_flags(), "--entrypoint", "sh", IMAGE, "-c",
                     "ls /; ls /opt/agentkeys/bin; id -un")  # fmt: skip
    assert "src" not in listing.stdout.split(), "the build stage's sources reached the image"
    assert "pip" not in listing.stdout.split() and "agentkeys" in listing.stdout.split()
    inspected = json.loads(podman("image", "inspect", IMAGE).stdout)[0]
    assert inspected["Config"]["User"] == "agentkeys" and "/var/lib/agentkeys" in inspected["Config"]["Volumes"]
    assert inspected["Healthcheck"]["Test"] == ["CMD", "agentkeys", "probe", "ready"]


def test_the_image_stops_on_sigterm(container):
    name, ports = container
    wait_ready(ports["metrics_port"])
    started = time.monotonic()
    podman("stop", "--time", "30", name)
    assert time.monotonic() - started < 30, "SIGTERM did not stop the proxy; podman had to kill it"
    assert podman("inspect", name, "--format", "{{.State.ExitCode}}").stdout.strip() == "0"
