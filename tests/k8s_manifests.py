"""deploy/kubernetes read as kustomize would build it, for the tests (no kustomize binary here).

Only what our kustomizations use is understood (`resources`, files or folders); any other field
fails the build, so a kustomization cannot grow a feature these tests would silently ignore.
"""

from dataclasses import dataclass
from pathlib import Path

import yaml

KUBERNETES = Path(__file__).resolve().parent.parent / "deploy" / "kubernetes"
UNDERSTOOD = {"apiVersion", "kind", "resources"}


def build(folder: Path) -> list[dict]:
    """Every object a kustomization folder yields, its bases' first."""
    kustomization = yaml.safe_load((folder / "kustomization.yaml").read_text())
    unknown = set(kustomization) - UNDERSTOOD
    assert not unknown, f"{folder}/kustomization.yaml: these tests do not build {sorted(unknown)}"
    objects = []
    for resource in kustomization["resources"]:
        path = (folder / resource).resolve()
        if path.is_dir():
            objects += build(path)
        else:
            objects += [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    return objects


def find(objects: list[dict], kind: str, name: str) -> dict:
    [found] = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    return found


def container(pod_spec: dict, name: str) -> dict:
    [found] = [c for c in pod_spec.get("initContainers", []) + pod_spec["containers"] if c["name"] == name]
    return found


@dataclass(frozen=True)
class Sidecar:
    """What the sidecar overlay runs: the init and proxy commands, the proxy's user, its config."""

    init_command: list[str]
    proxy_command: list[str]
    proxy_uid: int
    config: dict


def sidecar() -> Sidecar:
    objects = build(KUBERNETES / "sidecar")
    pod = find(objects, "Deployment", "agent")["spec"]["template"]["spec"]
    proxy = container(pod, "agentkeys")
    config = yaml.safe_load(find(objects, "ConfigMap", "agentkeys-sidecar-config")["data"]["agentkeys.yaml"])
    return Sidecar(
        init_command=container(pod, "agentkeys-init")["command"],
        proxy_command=proxy["command"],
        proxy_uid=proxy["securityContext"]["runAsUser"],
        config=config,
    )


@dataclass(frozen=True)
class KeylessPod:
    """What the keyless overlay runs: the agent pod, its exchange command, and the gateway's identity config."""

    pod: dict
    exchange_command: list[str]
    token_volume: dict  # the projected service-account token
    identity: dict  # the gateway config's identity.cluster
    gateway_config: dict


def keyless() -> KeylessPod:
    objects = build(KUBERNETES / "keyless")
    pod = find(objects, "Deployment", "keyless-agent")["spec"]["template"]["spec"]
    config = yaml.safe_load(find(objects, "ConfigMap", "agentkeys-gateway-config")["data"]["agentkeys.yaml"])
    [token_volume] = [v for v in pod["volumes"] if "projected" in v]
    return KeylessPod(
        pod=pod,
        exchange_command=container(pod, "agentkeys-exchange")["command"],
        token_volume=token_volume,
        identity=config["identity"]["cluster"],
        gateway_config=config,
    )


def mount_of(pod_spec: dict, container_name: str, volume_name: str) -> dict:
    [mount] = [m for m in container(pod_spec, container_name)["volumeMounts"] if m["name"] == volume_name]
    return mount
