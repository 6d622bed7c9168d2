"""Keyless issuance end to end: a GitHub job and a Kubernetes pod each get a working key from their own OIDC
token alone, through a real proxy, and spend it with the official SDK; every refusal is a 401 naming its
check, with an audit record; malformed tokens never make the proxy fail."""

import base64
import json
import os
import re
import subprocess
import sys
import time
from functools import reduce
from pathlib import Path

import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import httpx, start_proxy, stop_proxy, write_policy
from k8s_manifests import keyless, mount_of
from oidc_issuer import (
    CLUSTER_ALG,
    CLUSTER_ISSUER,
    GITHUB_ALG,
    GITHUB_ISSUER,
    Issuer,
    JwksServer,
    github_claims,
    unsigned,
)

REPO = Path(__file__).resolve().parents[2]
AUDIENCE = "https://agentkeys.acme.internal"


@pytest.fixture(scope="module")
def github():
    issuer = Issuer(GITHUB_ISSUER, GITHUB_ALG)
    with JwksServer(issuer) as server:
        issuer.server = server
        yield issuer


@pytest.fixture(scope="module")
def cluster():
    return Issuer(CLUSTER_ISSUER, CLUSTER_ALG)


@pytest.fixture(scope="module")
def proxy(mock, tmp_path_factory, github, cluster):
    folder = tmp_path_factory.mktemp("proxy")
    ci = write_policy(folder, "ci", budget_usd=5.0, ttl="1h")
    research = write_policy(folder, "research", budget_usd=1.0, ttl="1h")
    identity = {
        "github": {
            "issuer": GITHUB_ISSUER,
            "audience": AUDIENCE,
            "jwks_url": f"{github.server.url}/jwks",
            "rules": [{"match": {"repository": "acme/evals", "ref": "refs/heads/main"}, "policy": str(ci),
                       "budget_usd": 2}],
        },
        "cluster": {
            "issuer": CLUSTER_ISSUER,
            "audience": AUDIENCE,
            "jwks_file": str(cluster.write_jwks(folder / "cluster-jwks.json")),
            "rules": [{"match": {"namespace": "research", "serviceaccount": "agent"}, "policy": str(research)}],
        },
    }  # fmt: skip
    running = start_proxy(folder, mock, identity=identity)
    yield running
    stop_proxy(running)
    log = running.log_path.read_text()
    assert not re.search(r'File ".*/agentkeys/', log), f"the addon raised:\n{log}"


def exchange(proxy, token: str, **request) -> httpx.Response:
    return httpx.post(
        f"{proxy.gateway_url}/_agentkeys/v1/keys", headers={"authorization": f"Bearer {token}"}, json=request or None
    )


def chat(proxy, key: str):
    client = openai.OpenAI(api_key=key, base_url=f"{proxy.gateway_url}/openai/v1", max_retries=0)
    return client.chat.completions.with_raw_response.create(
        model="gpt-4o-mini", max_tokens=5, messages=[{"role": "user", "content": "hello"}]
    )


# ----- a job and a pod get their keys -----


def test_a_github_job_gets_a_working_key_from_its_token_alone(proxy, mock, github, tmp_path):
    """action.yml's script as a runner with `id-token: write` runs it: no issuer token, no secret."""
    github_env, github_output = tmp_path / "env", tmp_path / "output"
    env = {
        **{name: value for name, value in os.environ.items() if not name.startswith(("AGENTKEYS_", "ACTIONS_"))},
        "AGENTKEYS_URL": proxy.gateway_url,
        "AGENTKEYS_AUDIENCE": AUDIENCE,
        "AGENTKEYS_BUDGET": "0.5",
        "AGENTKEYS_POLICY": "ci",
        "ACTIONS_ID_TOKEN_REQUEST_URL": f"{github.server.url}/token?api-version=2.0",
        "ACTIONS_ID_TOKEN_REQUEST_TOKEN": github.server.request_token,
        "GITHUB_ENV": str(github_env),
        "GITHUB_OUTPUT": str(github_output),
        "GITHUB_REPOSITORY": "acme/evals",
        "GITHUB_RUN_ID": "4242424242",
    }
    script = REPO / "scripts" / "github_issue_key.py"
    ran = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=30)
    assert ran.returncode == 0, ran.stdout + ran.stderr
    exported = dict(line.split("=", 1) for line in github_env.read_text().splitlines())
    key = exported["OPENAI_API_KEY"]
    assert f"::add-mask::{key}" in ran.stdout and key.startswith("ak_")
    assert exported["OPENAI_BASE_URL"] == f"{proxy.gateway_url}/openai/v1"

    client = openai.OpenAI(api_key=key, base_url=exported["OPENAI_BASE_URL"], max_retries=0)
    reply = client.chat.completions.create(
        model="gpt-4o-mini", max_tokens=5, messages=[{"role": "user", "content": "hi"}]
    )
    assert reply.choices[0].message.content
    [call] = [r for r in proxy.records_for(exported["AGENTKEYS_KEY_ID"], 2) if r["provider"] == "openai"]
    assert call["metering"] == "usage" and call["cost_micros"] > 0
    assert mock.received[-1].headers["authorization"] == "Bearer sk-test-real-openai"
    identity = call["identity"]
    assert (identity["repository"], identity["run_id"], identity["workflow"], identity["issuer"]) == (
        "acme/evals",
        "4242424242",
        "evals",
        "github",
    )
    record = proxy.ledger().get_key(exported["AGENTKEYS_KEY_ID"])
    assert record.policy_name == "ci" and record.budget_micros == 500_000


def test_a_job_without_id_token_permission_is_told_what_to_add(proxy, tmp_path):
    env = {
        **{name: value for name, value in os.environ.items() if not name.startswith(("AGENTKEYS_", "ACTIONS_"))},
        "AGENTKEYS_URL": proxy.gateway_url,
        "GITHUB_ENV": str(tmp_path / "env"),
        "GITHUB_OUTPUT": str(tmp_path / "output"),
    }
    script = REPO / "scripts" / "github_issue_key.py"
    ran = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=30)
    assert ran.returncode == 1 and "permissions: id-token: write" in ran.stdout


def test_a_pod_gets_a_working_key_from_its_service_account_token(proxy, mock, cluster, tmp_path):
    """`agentkeys exchange`, as an init container runs it, with the pod's projected token."""
    token_file, key_file = tmp_path / "token", tmp_path / "key"
    token_file.write_text(cluster.pod_token(AUDIENCE))
    ran = run_exchange("--token-file", str(token_file), "--proxy", proxy.gateway_url, "--out", str(key_file))
    assert ran.returncode == 0, ran.stderr
    key = key_file.read_text().strip()
    assert key.startswith("ak_") and oct(key_file.stat().st_mode & 0o777) == "0o600"
    response = chat(proxy, key)
    assert response.status_code == 200
    key_id = re.search(r"key (\w+), expires", ran.stderr).group(1)
    [call] = [r for r in proxy.records_for(key_id, 2) if r["provider"] == "openai"]
    assert call["cost_micros"] > 0
    identity = call["identity"]
    assert (identity["namespace"], identity["serviceaccount"], identity["pod"]) == ("research", "agent", "agent-7f9c")
    again = run_exchange("--token-file", str(token_file), "--proxy", proxy.gateway_url)
    assert again.returncode == 1 and "token refused (replay)" in again.stderr


def test_the_sidecar_renews_the_key_from_the_rotated_token_before_it_expires(proxy, cluster, tmp_path):
    token_file, key_file = tmp_path / "token", tmp_path / "key"
    token_file.write_text(cluster.pod_token(AUDIENCE, exp=int(time.time()) + 8))
    sidecar = subprocess.Popen(
        [*agentkeys(), "exchange", "--token-file", str(token_file), "--proxy", proxy.gateway_url,
         "--out", str(key_file), "--renew-before", "5s"],
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        first = wait_for(lambda: key_file.exists() and key_file.read_text().strip())
        token_file.write_text(cluster.pod_token(AUDIENCE))  # the kubelet rotates the token
        second = wait_for(lambda: (key := key_file.read_text().strip()) != first and key, timeout=15)
        assert chat(proxy, second).status_code == 200
        expiry = proxy.ledger().get_key(second.split("_")[1]).expires_at
        assert expiry > time.time() + 3000, "the renewed key lives as long as the fresh token allows"
    finally:
        sidecar.terminate()
        assert sidecar.wait(timeout=10) == 0, sidecar.stderr.read()


def test_the_keyless_manifests_pod_gets_a_working_key_from_its_own_token(mock, cluster, tmp_path):
    """deploy/kubernetes/keyless as the kubelet would run it: the gateway's identity config and the
    sidecar's command from the manifests, with the pod's volumes as local folders."""
    manifest = keyless()
    identity = dict(manifest.identity, issuer=CLUSTER_ISSUER, jwks_file=str(cluster.write_jwks(tmp_path / "jwks.json")))
    [rule] = identity["rules"]
    identity["rules"] = [dict(rule, policy=str(write_policy(tmp_path, "agent", budget_usd=5.0, ttl="8h")))]
    proxy = start_proxy(tmp_path / "proxy", mock, identity={"cluster": identity})
    token_dir, key_dir = tmp_path / "token", tmp_path / "key"
    token_dir.mkdir()
    [source] = manifest.token_volume["projected"]["sources"]
    token = source["serviceAccountToken"]
    (token_dir / token["path"]).write_text(
        cluster.pod_token(token["audience"], namespace=rule["match"]["namespace"],
                          serviceaccount=manifest.pod["serviceAccountName"])
    )  # fmt: skip
    mounts = {
        mount_of(manifest.pod, "agentkeys-exchange", manifest.token_volume["name"])["mountPath"]: str(token_dir),
        mount_of(manifest.pod, "agentkeys-exchange", "agentkeys-key")["mountPath"]: str(key_dir),
        manifest.exchange_command[manifest.exchange_command.index("--proxy") + 1]: proxy.gateway_url,
    }
    command = [reduce(lambda a, path: a.replace(path, mounts[path]), mounts, arg) for arg in manifest.exchange_command]
    sidecar = subprocess.Popen([*agentkeys(), *command[1:]], stderr=subprocess.PIPE, text=True)
    try:
        key = wait_for(lambda: (key_dir / "key").exists() and (key_dir / "key").read_text().strip())
        response = chat(proxy, key)
        assert response.status_code == 200
        key_id = key.split("_")[1]
        assert proxy.ledger().get_key(key_id).budget_micros == 2_000_000, "the manifest's rule caps it at $2"
        [call] = [r for r in proxy.records_for(key_id, 2) if r["provider"] == "openai"]
        assert call["identity"]["serviceaccount"] == manifest.pod["serviceAccountName"]
    finally:
        sidecar.terminate()
        assert sidecar.wait(timeout=10) == 0, sidecar.stderr.read()
        stop_proxy(proxy)


def agentkeys() -> list[str]:
    return [sys.executable, "-m", "agentkeys.cli"]


def run_exchange(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*agentkeys(), "exchange", *args], capture_output=True, text=True, timeout=30)


def wait_for(condition, timeout: float = 10):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := condition():
            return value
        time.sleep(0.1)
    raise AssertionError("timed out")


# ----- refusals -----


def forged(github, cluster):
    """Signed by another key, presented under the real issuer's kid."""
    forger = Issuer(GITHUB_ISSUER)
    forger.add_key("RS256")
    return forger.sign(github_claims(AUDIENCE), header={"kid": github.published[0]})


def expired(github, cluster):
    now = int(time.time())
    return github.github_token(AUDIENCE, exp=now - 120, iat=now - 420)


REFUSED = {
    "aud": lambda github, cluster: github.github_token("https://someone-else.example"),
    "iss": lambda github, cluster: github.sign(github_claims(AUDIENCE, iss="https://token.example.com")),
    "exp": expired,
    "nbf": lambda github, cluster: cluster.pod_token(AUDIENCE, nbf=int(time.time()) + 300),
    "alg": lambda github, cluster: unsigned(github_claims(AUDIENCE)),
    "kid": lambda github, cluster: github.github_token(AUDIENCE, kid=github.add_key("RS256", publish=False)),
    "signature": forged,
    "rule": lambda github, cluster: cluster.pod_token(AUDIENCE, namespace="default"),
}


@pytest.mark.parametrize("check", sorted(REFUSED))
def test_each_refusal_is_a_401_naming_its_check_with_an_audit_record(proxy, github, cluster, check):
    answer = exchange(proxy, REFUSED[check](github, cluster))
    assert answer.status_code == 401, answer.text
    error = answer.json()["error"]
    assert error["code"] == check and error["type"] == "authentication_error"
    assert f"token refused ({check})" in error["message"]
    record = wait_for(lambda: [r for r in proxy.audit() if r["reason"] == error["message"]])[-1]
    assert (record["decision"], record["status"], record["provider"]) == ("deny", 401, "agentkeys")


def test_a_token_used_twice_is_refused_with_who_it_was(proxy, github):
    token = github.github_token(AUDIENCE)
    assert exchange(proxy, token).status_code == 201
    replay = exchange(proxy, token)
    assert replay.status_code == 401 and replay.json()["error"]["code"] == "replay"
    record = wait_for(lambda: [r for r in proxy.audit() if "token refused (replay)" in r["reason"]])[-1]
    assert record["identity"]["repository"] == "acme/evals"


def test_a_refused_rule_is_audited_with_the_identity_the_token_proved(proxy, cluster):
    answer = exchange(proxy, cluster.pod_token(AUDIENCE, namespace="default", serviceaccount="builder"))
    assert answer.json()["error"]["code"] == "rule"
    record = wait_for(lambda: [r for r in proxy.audit() if "serviceaccount='builder'" in r["reason"]])[-1]
    assert (record["identity"]["namespace"], record["identity"]["serviceaccount"]) == ("default", "builder")


def test_a_key_minted_from_a_token_has_at_most_the_rules_budget_and_the_tokens_lifetime(proxy, github):
    token = github.github_token(AUDIENCE)
    claims = json.loads(base64.urlsafe_b64decode(token.split(".")[1] + "=="))
    issued = exchange(proxy, token).json()
    assert issued["budget_usd"] == 2.0 and issued["policy"] == "ci"
    assert (issued["identity"]["repository"], issued["identity"]["jti"]) == ("acme/evals", claims["jti"])
    assert proxy.ledger().get_key(issued["id"]).expires_at <= claims["exp"]
    greedy = exchange(proxy, github.github_token(AUDIENCE), budget_usd=3)
    assert greedy.status_code == 403 and greedy.json()["error"]["code"] == "budget"


# ----- malformed tokens never make the proxy fail -----

B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def encoded_json(strategy) -> st.SearchStrategy[str]:
    return strategy.map(lambda value: b64(json.dumps(value).encode()))


def encoded_header_of_size(size: int) -> str:
    return b64(json.dumps({"alg": "RS256", "x": "a" * size}).encode())


claim_sets = st.fixed_dictionaries(
    {"iss": st.sampled_from([GITHUB_ISSUER, CLUSTER_ISSUER]) | json_values},
    optional={name: json_values for name in ("aud", "exp", "nbf", "iat", "jti", "sub", "kubernetes.io")},
)
headers = st.fixed_dictionaries(
    {}, optional={"alg": st.sampled_from(["RS256", "ES256", "none", "HS256"]) | json_values, "kid": json_values}
)
malformed_tokens = st.one_of(
    st.lists(st.text(alphabet=B64 + "=+/!", min_size=1, max_size=40), min_size=3, max_size=3).map(".".join),
    st.tuples(encoded_json(headers), encoded_json(claim_sets), st.text(alphabet=B64, max_size=64)).map(".".join),
    st.tuples(encoded_json(json_values), encoded_json(json_values), st.just("")).map(".".join),
    st.tuples(st.binary(max_size=64).map(b64), st.binary(max_size=64).map(b64), st.just("c2ln")).map(".".join),
    st.integers(1_000, 60_000).map(
        lambda size: b64(json.dumps({"alg": "RS256", "x": "a" * size}).encode()) + ".e30.c2ln"
    ),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(token=malformed_tokens)
def test_malformed_tokens_are_refused_never_a_server_error(proxy, token):
    answer = exchange(proxy, token)
    assert answer.status_code in (401, 431), (token[:200], answer.status_code, answer.text[:300])
    if answer.status_code == 401:
        assert answer.json()["error"]["message"].startswith("agentkeys:")


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(claims=claim_sets)
def test_signed_tokens_with_claims_of_any_type_are_refused_or_issued_never_a_server_error(proxy, github, claims):
    answer = exchange(proxy, github.sign(claims))
    assert answer.status_code in (201, 401), (claims, answer.status_code, answer.text[:300])
