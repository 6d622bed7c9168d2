"""deploy/kubernetes: every manifest valid against the Kubernetes API schema (offline), and the
properties the deployment docs promise, read from the manifests themselves."""

import json
import shlex

import kubernetes_validate
import pytest
import yaml

from agentkeys.cli import build_parser
from agentkeys.policy import Policy, ProxyConfig, parse_duration
from k8s_manifests import KUBERNETES, build, container, find, keyless, mount_of, sidecar

# Native sidecars (an init container with restartPolicy: Always) are on by default from 1.29.
KUBERNETES_VERSIONS = ["1.29", "1.33"]
OVERLAYS = ["sidecar", "gateway", "keyless"]


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_manifest_is_valid_against_the_api_schema(overlay, version):
    objects = build(KUBERNETES / overlay)
    assert objects
    for manifest in objects:
        try:  # strict: a misspelt or misplaced field is an error, not ignored
            kubernetes_validate.validate(manifest, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{overlay}: {manifest['kind']}/{manifest['metadata']['name']}: {e.message} at {e.path}")


def test_the_validator_refuses_a_wrong_manifest():
    broken = build(KUBERNETES / "sidecar")[0] | {"spec": {"replicas": "three"}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSIONS[0], strict=True)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_configs_and_policies_load(overlay):
    objects = build(KUBERNETES / overlay)
    for config_map in (o for o in objects if o["kind"] == "ConfigMap"):
        for name, text in config_map["data"].items():
            if name.endswith(".json"):  # the cluster's JWKS (see the keyless tests)
                continue
            model = Policy if name.endswith(".policy.yaml") else ProxyConfig
            model.model_validate(yaml.safe_load(text))


def pod_of(overlay: str, deployment: str) -> dict:
    return find(build(KUBERNETES / overlay), "Deployment", deployment)["spec"]["template"]["spec"]


def every_container(pod: dict) -> list[dict]:
    return pod.get("initContainers", []) + pod["containers"]


def test_sidecar_only_the_init_container_may_change_the_network():
    pod = pod_of("sidecar", "agent")
    with_net_admin = [c["name"] for c in every_container(pod) if "NET_ADMIN" in c_caps(c)]
    assert with_net_admin == ["agentkeys-init"]
    assert pod["initContainers"][0]["name"] == "agentkeys-init", "the rules must be in place before anything runs"


def c_caps(c: dict) -> list[str]:
    return c.get("securityContext", {}).get("capabilities", {}).get("add", [])


def test_sidecar_real_keys_reach_only_the_proxy_and_the_agent_gets_the_scoped_key():
    pod = pod_of("sidecar", "agent")
    holders = [c["name"] for c in every_container(pod) if "agentkeys-provider-keys" in yaml.safe_dump(c)]
    assert holders == ["agentkeys"]
    agent = container(pod, "agent")
    [key] = [e for e in agent["env"] if e["name"] == "OPENAI_API_KEY"]
    assert key["valueFrom"]["secretKeyRef"]["name"] == "agentkeys-agent-key"


def test_sidecar_agent_trusts_the_proxys_ca_from_the_shared_volume():
    pod = pod_of("sidecar", "agent")
    config = sidecar().config
    proxy, agent = container(pod, "agentkeys"), container(pod, "agent")
    [proxy_ca] = [m for m in proxy["volumeMounts"] if m["mountPath"] == config["certs_dir"]]
    [agent_ca] = [m for m in agent["volumeMounts"] if m["name"] == proxy_ca["name"]]
    assert agent_ca["readOnly"]
    env = {e["name"]: e.get("value") for e in agent["env"]}
    mount = agent_ca["mountPath"]
    assert env["SSL_CERT_FILE"] == env["REQUESTS_CA_BUNDLE"] == f"{mount}/agentkeys-ca-bundle.pem"
    assert env["NODE_EXTRA_CA_CERTS"] == f"{mount}/mitmproxy-ca-cert.pem"
    assert not {"HTTPS_PROXY", "OPENAI_BASE_URL"} & set(env), "the sidecar needs no cooperation from the agent"


def test_sidecar_init_redirects_to_the_proxys_transparent_port_and_spares_only_the_proxy():
    manifest = sidecar()
    args = build_parser().parse_args(manifest.init_command[1:])
    assert manifest.init_command[0] == "agentkeys" and args.run.__name__ == "cmd_sidecar_init"
    assert args.to_port == manifest.config["transparent_port"]
    assert args.proxy_uid == manifest.proxy_uid
    assert args.drop_others, "without it an agent could leave on any port that is not redirected"
    agent = container(pod_of("sidecar", "agent"), "agent")
    assert agent["securityContext"]["runAsUser"] != manifest.proxy_uid
    assert shlex.join(manifest.proxy_command) == "agentkeys serve --workers 1", "one agent: one worker"


def test_gateway_probes_the_metrics_port_and_keeps_replicas_through_disruptions():
    objects = build(KUBERNETES / "gateway")
    deployment = find(objects, "Deployment", "agentkeys-gateway")
    config = yaml.safe_load(find(objects, "ConfigMap", "agentkeys-gateway-config")["data"]["agentkeys.yaml"])
    proxy = container(deployment["spec"]["template"]["spec"], "agentkeys")
    ports = {p["name"]: p["containerPort"] for p in proxy["ports"]}
    assert ports == {name: config[f"{name}_port"] for name in ("proxy", "gateway", "metrics")}
    assert proxy["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    assert proxy["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert deployment["spec"]["replicas"] > 1 and config["store"].startswith("redis://")
    pdb = find(objects, "PodDisruptionBudget", "agentkeys-gateway")
    assert pdb["spec"]["selector"] == deployment["spec"]["selector"]
    assert 0 < pdb["spec"]["minAvailable"] < deployment["spec"]["replicas"]
    service = find(objects, "Service", "agentkeys-gateway")
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]


def test_the_gateway_runs_a_worker_for_each_core_its_pod_asks_for():
    """Without --workers, serve starts a worker per core of the node, which no CPU quota reduces."""
    deployment = find(build(KUBERNETES / "gateway"), "Deployment", "agentkeys-gateway")
    proxy = container(deployment["spec"]["template"]["spec"], "agentkeys")
    args = build_parser().parse_args(proxy["command"][1:])
    assert proxy["command"][0] == "agentkeys" and args.run.__name__ == "cmd_serve"
    assert args.workers == int(proxy["resources"]["requests"]["cpu"])


def test_agent_pods_may_reach_only_the_gateway_and_dns():
    objects = build(KUBERNETES / "gateway")
    policy = find(objects, "NetworkPolicy", "agents-reach-only-agentkeys")["spec"]
    gateway_labels = find(objects, "Deployment", "agentkeys-gateway")["spec"]["template"]["metadata"]["labels"]
    assert policy["policyTypes"] == ["Egress"]
    to_gateway, to_dns = policy["egress"]
    [peer] = to_gateway["to"]
    assert peer["podSelector"]["matchLabels"].items() <= gateway_labels.items()
    assert {p["port"] for p in to_gateway["ports"]} == {8080, 8081}
    assert {p["port"] for p in to_dns["ports"]} == {53}
    assert to_dns["to"][0]["podSelector"]["matchLabels"] == {"k8s-app": "kube-dns"}


def test_keyless_pod_holds_no_secret_and_its_key_lives_in_memory():
    manifest = keyless()
    pod = manifest.pod
    assert "secretKeyRef" not in yaml.safe_dump(pod) and "secretRef" not in yaml.safe_dump(pod)
    args = build_parser().parse_args(manifest.exchange_command[1:])
    assert args.run.__name__ == "cmd_exchange"
    [key_volume] = [v for v in pod["volumes"] if v["name"] == mount_of(pod, "agent", "agentkeys-key")["name"]]
    assert key_volume["emptyDir"] == {"medium": "Memory"}
    assert str(args.out.parent) == mount_of(pod, "agentkeys-exchange", "agentkeys-key")["mountPath"]
    assert mount_of(pod, "agent", "agentkeys-key")["readOnly"]
    assert str(args.out) in " ".join(container(pod, "agent")["command"]), "the agent reads the key it is given"
    probe = container(pod, "agentkeys-exchange")["startupProbe"]["exec"]["command"]
    assert probe == ["test", "-s", str(args.out)], "the agent must not start before its key exists"
    assert container(pod, "agentkeys-exchange")["restartPolicy"] == "Always", "it renews while the agent runs"


def test_keyless_token_is_for_the_gateway_and_renewals_follow_its_rotations():
    manifest = keyless()
    args = build_parser().parse_args(manifest.exchange_command[1:])
    [source] = manifest.token_volume["projected"]["sources"]
    token = source["serviceAccountToken"]
    mount = mount_of(manifest.pod, "agentkeys-exchange", manifest.token_volume["name"])
    assert str(args.token_file) == f"{mount['mountPath']}/{token['path']}"
    assert token["audience"] == manifest.identity["audience"]
    [rule] = manifest.identity["rules"]
    assert rule["match"]["serviceaccount"] == manifest.pod["serviceAccountName"]
    assert token["expirationSeconds"] <= parse_duration(rule["ttl"]), "a key never outlives its token"
    # the kubelet rotates the token at 80% of its life: the renewal must look after that
    assert args.renew_before < 0.2 * token["expirationSeconds"]
    service = find(build(KUBERNETES / "keyless"), "Service", "agentkeys-gateway")
    gateway_port = next(p["port"] for p in service["spec"]["ports"] if p["name"] == "gateway")
    assert args.proxy == f"http://agentkeys-gateway:{gateway_port}"
    assert manifest.pod["containers"][0]["env"][0]["value"].startswith(args.proxy)


def test_keyless_gateway_reads_the_clusters_keys_from_a_folder_it_can_update():
    objects = build(KUBERNETES / "keyless")
    gateway = find(objects, "Deployment", "agentkeys-gateway")["spec"]["template"]["spec"]
    jwks_file = keyless().identity["jwks_file"]
    mounts = container(gateway, "agentkeys")["volumeMounts"]
    mount = next(m for m in mounts if jwks_file.startswith(m["mountPath"] + "/"))
    assert "subPath" not in mount, "a subPath mount never sees the ConfigMap updated"
    [volume] = [v for v in gateway["volumes"] if v["name"] == mount["name"]]
    jwks = find(objects, "ConfigMap", volume["configMap"]["name"])["data"]
    assert json.loads(jwks[jwks_file.rsplit("/", 1)[1]]) == {"keys": []}


@pytest.mark.parametrize(("overlay", "deployment"), [("sidecar", "agent"), ("gateway", "agentkeys-gateway")])
def test_the_kubelet_waits_longer_than_the_proxy_drains(overlay, deployment):
    """SIGTERM lets calls in flight finish for shutdown_grace; a SIGKILL before that would lose their records."""
    objects = build(KUBERNETES / overlay)
    config_map = next(o for o in objects if o["kind"] == "ConfigMap" and "agentkeys.yaml" in o["data"])
    config = ProxyConfig.model_validate(yaml.safe_load(config_map["data"]["agentkeys.yaml"]))
    assert pod_of(overlay, deployment)["terminationGracePeriodSeconds"] > config.shutdown_grace
