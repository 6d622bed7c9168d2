"""Keyless issuance, unit by unit (no proxy): the `identity` config, token verification and every refusal,
the rules, and the key an exchange mints (its budget, lifetime and identity), on a real SQLite ledger."""

import asyncio
import hashlib
import hmac
import json
import textwrap
import time

import jwt
import pytest
import yaml
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from agentkeys.identity import LEEWAY_SECONDS, ExchangeRefused, claim_facts, identities_from, looks_like_jwt
from agentkeys.ledger import SqliteLedger
from agentkeys.policy import current_policies, load_config
from agentkeys.store import Store
from agentkeys.yamlfile import ConfigError
from oidc_issuer import CLUSTER_ALG, CLUSTER_ISSUER, GITHUB_ALG, GITHUB_ISSUER, Issuer, github_claims, unsigned

AUDIENCE = "https://agentkeys.acme.internal"


@pytest.fixture(scope="module")
def github():
    return Issuer(GITHUB_ISSUER, GITHUB_ALG)


@pytest.fixture(scope="module")
def cluster():
    return Issuer(CLUSTER_ISSUER, CLUSTER_ALG)


def write_config(folder, github: Issuer, cluster: Issuer, overrides: dict | None = None):
    for name, budget in (("ci", 5.0), ("research", 10.0)):
        (folder / f"{name}.policy.yaml").write_text(
            yaml.safe_dump(
                {"name": name, "ttl": "1h", "budget_usd": budget, "providers": ["openai"],
                 "endpoints": ["POST /v1/chat/completions"], "models": ["gpt-4o-mini*"]}
            )
        )  # fmt: skip
    identity = {
        "github": {
            "issuer": GITHUB_ISSUER,
            "audience": AUDIENCE,
            "jwks_file": str(github.write_jwks(folder / "github-jwks.json")),
            "rules": [
                {"match": {"repository": "acme/evals", "ref": "refs/heads/main"}, "policy": "ci.policy.yaml",
                 "budget_usd": 2, "ttl": "30m"},
                {"match": {"repository_owner": "acme", "event_name": ["pull_request", "workflow_dispatch"]},
                 "policy": "ci.policy.yaml", "budget_usd": 0.5},
                {"match": {"repository": "acme/evals"}, "policy": "research.policy.yaml", "budget_usd": 1},
            ],
        },
        "cluster": {
            "issuer": CLUSTER_ISSUER,
            "audience": AUDIENCE,
            "jwks_file": str(cluster.write_jwks(folder / "cluster-jwks.json")),
            "rules": [
                {"match": {"namespace": "research", "serviceaccount": "agent*"}, "policy": "research.policy.yaml",
                 "ttl": "20m"},
            ],
        },
        **(overrides or {}),
    }  # fmt: skip
    path = folder / "agentkeys.yaml"
    path.write_text(yaml.safe_dump({"store": "sqlite:///agentkeys.db", "identity": identity}))
    return load_config(path)


@pytest.fixture
def exchange(tmp_path, github, cluster):
    """exchange(token, body=b"") -> the issued key; the ledger is the config's SQLite file."""
    config = write_config(tmp_path, github, cluster)
    identities = identities_from(config)
    store = Store(SqliteLedger(tmp_path / "agentkeys.db"))

    def run(token: str, body: bytes = b""):
        return asyncio.run(identities.exchange(token, body, store))

    run.ledger = store.ledger
    yield run
    store.close()


def refused(exchange, token: str, body: bytes = b"") -> ExchangeRefused:
    with pytest.raises(ExchangeRefused) as caught:
        exchange(token, body)
    return caught.value


# ----- the keys it mints -----


def test_a_github_job_gets_its_rules_key_no_longer_lived_than_its_token(exchange, github):
    token = github.github_token(AUDIENCE)
    issued = exchange(token)
    record = exchange.ledger.get_key(issued.record.key_id)
    claims = jwt.decode(token, options={"verify_signature": False})
    assert record.policy_name == "ci" and record.budget_micros == 2_000_000, "the rule's ceiling, not the policy's $5"
    assert record.expires_at <= claims["exp"] and record.expires_at == pytest.approx(claims["exp"], abs=2)
    assert record.name == "github: acme/evals run 4242424242"
    identity = json.loads(record.identity_json)
    assert identity == {
        "issuer": "github", "iss": GITHUB_ISSUER, "jti": claims["jti"], "sub": "repo:acme/evals:ref:refs/heads/main",
        "repository": "acme/evals", "repository_owner": "acme", "ref": "refs/heads/main", "sha": claims["sha"],
        "workflow": "evals", "workflow_ref": claims["workflow_ref"], "job_workflow_ref": claims["job_workflow_ref"],
        "run_id": "4242424242", "run_number": "10", "run_attempt": "1", "actor": "octocat", "event_name": "push",
    }  # fmt: skip


def test_the_rules_ttl_caps_a_long_lived_token(exchange, cluster):
    issued = exchange(cluster.pod_token(AUDIENCE))
    record = exchange.ledger.get_key(issued.record.key_id)
    assert record.expires_at - record.created_at == pytest.approx(20 * 60), "the rule's 20m, not the token's 1h"
    assert record.budget_micros == 10_000_000, "no budget in the rule: the policy's"
    identity = json.loads(record.identity_json)
    assert (identity["namespace"], identity["serviceaccount"], identity["pod"], identity["node"]) == (
        "research",
        "agent",
        "agent-7f9c",
        "node-1",
    )
    assert record.name == "cluster: research/agent pod agent-7f9c"


def test_the_bearer_may_ask_for_less_never_for_more(exchange, github):
    issued = exchange(github.github_token(AUDIENCE), b'{"name": "evals", "budget_usd": 0.25, "ttl": "2m"}')
    record = exchange.ledger.get_key(issued.record.key_id)
    assert (record.name, record.budget_micros) == ("evals", 250_000)
    assert record.expires_at - record.created_at == pytest.approx(120)
    more = refused(exchange, github.github_token(AUDIENCE), b'{"budget_usd": 3}')
    assert (more.status, more.check) == (403, "budget") and "at most $2" in more.message
    longer = refused(exchange, github.github_token(AUDIENCE), b'{"ttl": "2h"}')
    assert (longer.status, longer.check) == (403, "ttl")
    other = refused(exchange, github.github_token(AUDIENCE), b'{"policy": "admin"}')
    assert (other.status, other.check) == (403, "policy") and "it may get: ci, research" in other.message
    bad = refused(exchange, github.github_token(AUDIENCE), b'{"policy": "ci", "budget": 1}')
    assert (bad.status, bad.check) == (400, "request")
    assert exchange(github.github_token(AUDIENCE), b'{"policy": "ci"}').record.policy_name == "ci"


def test_a_refused_request_does_not_use_up_the_token(exchange, github):
    token = github.github_token(AUDIENCE)
    refused(exchange, token, b'{"budget_usd": 100}')
    assert exchange(token).record.budget_micros == 2_000_000


def test_the_first_matching_rule_decides_unless_the_bearer_names_another_rules_policy(exchange, github):
    pull_request = github.github_token(
        AUDIENCE, repository="acme/web", event_name="pull_request", ref="refs/pull/7/merge"
    )
    assert exchange(pull_request).record.budget_micros == 500_000
    research = exchange(github.github_token(AUDIENCE), b'{"policy": "research"}').record
    assert (research.policy_name, research.budget_micros) == ("research", 1_000_000)


def test_a_service_account_named_only_in_sub_matches_too(exchange, cluster):
    token = cluster.pod_token(AUDIENCE, **{"kubernetes.io": None, "sub": "system:serviceaccount:research:agent-2"})
    identity = json.loads(exchange(token).record.identity_json)
    assert (identity["namespace"], identity["serviceaccount"]) == ("research", "agent-2")


def test_claim_facts_never_take_a_non_string_claim():
    facts = claim_facts({"repository": ["acme/evals"], "ref": 7, "sub": "x", "kubernetes.io": {"namespace": {"a": 1}}})
    assert facts == {"sub": "x"}


# ----- every refusal, and the check it names -----


def test_a_token_for_another_audience_or_none_is_refused(exchange, github, cluster):
    assert refused(exchange, github.github_token("https://someone-else.example")).check == "aud"
    assert refused(exchange, github.github_token(AUDIENCE, aud=None)).check == "aud"
    assert refused(exchange, cluster.pod_token(AUDIENCE, aud=["https://kubernetes.default.svc"])).check == "aud"
    wrong_type = refused(exchange, github.github_token(AUDIENCE, aud=42))
    assert wrong_type.check == "aud" and wrong_type.status == 401


def test_a_token_of_an_untrusted_issuer_is_refused_even_if_signed_by_a_trusted_key(exchange, github):
    impostor = github.sign(github_claims(AUDIENCE, iss="https://token.actions.example.com"))
    failure = refused(exchange, impostor)
    assert failure.check == "iss" and "not trusted here" in failure.message
    assert refused(exchange, github.sign(github_claims(AUDIENCE, iss=None))).check == "iss"


def test_an_expired_token_is_refused_beyond_the_leeway_and_accepted_within_it(exchange, github):
    now = int(time.time())
    late = refused(exchange, github.github_token(AUDIENCE, exp=now - LEEWAY_SECONDS - 30, iat=now - 400))
    assert late.check == "exp" and f"{LEEWAY_SECONDS} s of clock skew" in late.message
    assert exchange(github.github_token(AUDIENCE, exp=now + 20, iat=now - 280)).record is not None
    assert refused(exchange, github.github_token(AUDIENCE, exp=None)).check == "exp"


def test_a_token_not_yet_valid_is_refused_beyond_the_leeway(exchange, github, cluster):
    now = int(time.time())
    early = refused(exchange, cluster.pod_token(AUDIENCE, nbf=now + LEEWAY_SECONDS + 60, iat=now))
    assert early.check == "nbf"
    from_the_future = refused(exchange, github.github_token(AUDIENCE, iat=now + LEEWAY_SECONDS + 60, nbf=None))
    assert from_the_future.check == "nbf"
    assert exchange(cluster.pod_token(AUDIENCE, nbf=now + 30)).record is not None, "within the leeway"


def test_an_unsigned_token_is_refused(exchange, github):
    failure = refused(exchange, unsigned(github_claims(AUDIENCE), kid=github.published[0]))
    assert failure.check == "alg" and "not signed" in failure.message
    assert refused(exchange, unsigned(github_claims(AUDIENCE), alg="None")).check == "alg"
    assert refused(exchange, unsigned(github_claims(AUDIENCE), alg=None)).check == "alg"


def test_the_token_cannot_choose_an_algorithm_its_key_does_not_have(exchange, github):
    kid = github.published[0]
    stronger = refused(exchange, github.sign(github_claims(AUDIENCE), kid, alg="RS512"))
    assert stronger.check == "alg" and "signs with RS256" in stronger.message
    # The classic confusion: HMAC keyed with the issuer's public key, which anyone can read.
    public_pem = github.private[kid][0].public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
    header = jwt.utils.base64url_encode(json.dumps({"alg": "HS256", "kid": kid}).encode())
    payload = jwt.utils.base64url_encode(json.dumps(github_claims(AUDIENCE)).encode())
    signature = jwt.utils.base64url_encode(hmac.new(public_pem, header + b"." + payload, hashlib.sha256).digest())
    confused = (header + b"." + payload + b"." + signature).decode()
    assert refused(exchange, confused).check == "alg"


def test_a_signature_by_another_key_under_a_known_kid_is_refused(exchange, github):
    forger = Issuer(GITHUB_ISSUER)
    forger.add_key("RS256")
    forged = forger.sign(github_claims(AUDIENCE), header={"kid": github.published[0]})
    assert refused(exchange, forged).check == "signature"


def test_a_key_the_issuer_never_published_is_refused_as_an_unknown_kid(exchange, github):
    unpublished = github.add_key("RS256", publish=False)
    failure = refused(exchange, github.github_token(AUDIENCE, kid=unpublished))
    assert failure.check == "kid" and "even after refreshing" in failure.message
    github.private.pop(unpublished)


def test_a_token_used_twice_is_refused_the_second_time(exchange, cluster):
    token = cluster.pod_token(AUDIENCE)
    exchange(token)
    replay = refused(exchange, token)
    assert replay.check == "replay" and replay.identity["serviceaccount"] == "agent"


def test_a_token_without_jti_can_still_be_used_only_once(exchange, cluster):
    token = cluster.pod_token(AUDIENCE, jti=None)
    exchange(token)
    assert refused(exchange, token).check == "replay"


def test_a_token_no_rule_matches_is_refused_naming_what_it_claimed(exchange, github):
    failure = refused(exchange, github.github_token(AUDIENCE, repository="mallory/evals"))
    assert failure.check == "rule" and "repository='mallory/evals'" in failure.message
    assert failure.identity["repository"] == "mallory/evals"
    pushed = refused(exchange, github.github_token(AUDIENCE, repository="acme/web"))
    assert pushed.check == "rule", "acme's, but a push to a repository no rule names"


@pytest.mark.parametrize(
    "claims, check",
    [
        ({"exp": "soon"}, "malformed"),
        ({"jti": 12345}, "jti"),
        ({"jti": "x" * 1000}, "jti"),
        ({"iat": "yesterday"}, "iat"),
        ({"sub": ["repo:acme/evals"]}, "sub"),
    ],
)
def test_claims_of_the_wrong_type_are_refused(exchange, github, claims, check):
    assert refused(exchange, github.github_token(AUDIENCE, **claims)).check == check


@pytest.mark.parametrize(
    "token",
    [
        "a.b.c",
        "e30.e30.",
        "eyJhbGciOiJSUzI1NiJ9.bm90IGpzb24.c2ln",
        "x" * 20_000,
        "eyJhbGciOiJSUzI1NiIsImtpZCI6WzFdfQ.e30.AA",
    ],
    ids=["bad-base64", "empty-objects", "payload-not-json", "huge", "kid-a-list"],
)
def test_a_malformed_token_is_refused(exchange, token):
    assert refused(exchange, token).status == 401


def test_what_looks_like_a_jwt():
    assert looks_like_jwt("eyJh.eyJz.c2ln") and looks_like_jwt("eyJh.eyJz.")
    assert not looks_like_jwt("ak_0123456789ab_secret") and not looks_like_jwt("a.b") and not looks_like_jwt("a.b.c.d")


# ----- the config -----


def config_error(tmp_path, github, cluster, overrides: dict) -> str:
    with pytest.raises(ConfigError) as caught:
        write_config(tmp_path, github, cluster, overrides)
    return str(caught.value)


def test_a_github_rule_must_name_the_repository_it_trusts(tmp_path, github, cluster):
    problem = config_error(
        tmp_path, github, cluster,
        {"github": {"issuer": GITHUB_ISSUER, "audience": AUDIENCE, "jwks_url": f"{GITHUB_ISSUER}/.well-known/jwks",
                    "rules": [{"match": {"ref": "refs/heads/main"}, "policy": "ci.policy.yaml"}]}},
    )  # fmt: skip
    assert "agentkeys.yaml:" in problem and "identity.github" in problem and "name one of repository" in problem


def test_identity_config_errors_name_file_line_and_field(tmp_path):
    path = tmp_path / "agentkeys.yaml"
    path.write_text(
        textwrap.dedent(
            """\
            identity:
              cluster:
                issuer: https://kubernetes.default.svc
                jwks_file: jwks.json
                jwks_url: https://kubernetes.default.svc/openid/v1/jwks
                rules:
                  - match: {namespace: research, service_account: agent}
                    policy: research.policy.yaml
                    budget_usd: -1
            """
        )
    )
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert caught.value.problems == [
        f"{path}:2: identity.cluster.audience: Field required",
        f"{path}:7: identity.cluster.rules.0.match.service_account: Extra inputs are not permitted",
        f"{path}:9: identity.cluster.rules.0.budget_usd: Input should be greater than 0",
    ]


def test_exactly_one_source_of_keys(tmp_path, github, cluster):
    both = {"issuer": CLUSTER_ISSUER, "audience": AUDIENCE, "jwks_file": "x.json", "jwks_url": "https://x/jwks",
            "rules": [{"match": {"namespace": "a"}, "policy": "research.policy.yaml"}]}  # fmt: skip
    assert "exactly one of jwks_url or jwks_file" in config_error(tmp_path, github, cluster, {"cluster": both})
    del both["jwks_file"], both["jwks_url"]
    assert "exactly one of jwks_url or jwks_file" in config_error(tmp_path, github, cluster, {"cluster": both})


def test_a_rule_must_match_something(tmp_path, github, cluster):
    empty = {"issuer": CLUSTER_ISSUER, "audience": AUDIENCE, "jwks_file": "x.json",
             "rules": [{"match": {}, "policy": "research.policy.yaml"}]}  # fmt: skip
    assert "name at least one claim" in config_error(tmp_path, github, cluster, {"cluster": empty})


def test_the_rules_policies_are_kept_in_step_with_their_files_like_every_issuers(tmp_path, github, cluster):
    assert sorted(current_policies(write_config(tmp_path, github, cluster))) == ["ci", "research"]


def test_an_unreadable_key_file_stops_the_proxy_at_start(tmp_path, github, cluster):
    config = write_config(tmp_path, github, cluster)
    (tmp_path / "cluster-jwks.json").write_text("{not json")
    with pytest.raises(ConfigError, match="cluster-jwks.json: identity.cluster.jwks_file: not JSON"):
        identities_from(config)
