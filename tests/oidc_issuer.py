"""An OIDC issuer for the tests: its own RSA and EC keys, its JWKS in a file or served on 127.0.0.1, and
tokens with the claims GitHub Actions and Kubernetes send.

The claim sets follow the platforms' documentation: GitHub's "Understanding the OIDC token" example
(header `typ`, `alg`, `x5t`, `kid`; `nbf` ten minutes before `iat`, `exp` five minutes after it) and
Kubernetes' "Managing Service Accounts" example of a pod-bound token (`aud` a list, the
`kubernetes.io` claims naming the namespace, pod, node and service account, `sub`
system:serviceaccount:NAMESPACE:NAME).
"""

import base64
import json
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

GITHUB_ISSUER = "https://token.actions.githubusercontent.com"
GITHUB_ALG, CLUSTER_ALG = "RS256", "ES256"  # GitHub signs with RSA; a cluster's key may as well be EC
GITHUB_X5T = "cZ8SUe0Sg9TTZ4ot_Hr8a2wY2v0"  # a certificate thumbprint, as GitHub's header carries one
CLUSTER_ISSUER = "https://kubernetes.default.svc.cluster.local"
EC_CURVES = {"ES256": ec.SECP256R1, "ES384": ec.SECP384R1}


class Issuer:
    """Signing keys by kid, each with the algorithm its JWK names."""

    def __init__(self, iss: str, alg: str | None = None):
        """With `alg`, the issuer starts with one published key of that algorithm."""
        self.iss = iss
        self.private: dict[str, tuple[object, str]] = {}  # kid -> (private key, alg)
        self.published: list[str] = []  # the kids in the JWKS
        if alg:
            self.add_key(alg)

    def add_key(self, alg: str = "RS256", publish: bool = True) -> str:
        kid = f"{alg.lower()}-{uuid.uuid4().hex[:8]}"
        if alg.startswith(("RS", "PS")):
            key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        else:
            key = ec.generate_private_key(EC_CURVES[alg]())
        self.private[kid] = (key, alg)
        if publish:
            self.published.append(kid)
        return kid

    def jwks(self) -> dict:
        keys = []
        for kid in self.published:
            key, alg = self.private[kid]
            to_jwk = RSAAlgorithm.to_jwk if isinstance(key, rsa.RSAPrivateKey) else ECAlgorithm.to_jwk
            keys.append({**json.loads(to_jwk(key.public_key())), "kid": kid, "alg": alg, "use": "sig"})
        return {"keys": keys}

    def write_jwks(self, path: Path) -> Path:
        path.write_text(json.dumps(self.jwks()))
        return path

    def sign(self, claims: dict, kid: str | None = None, alg: str | None = None, header: dict | None = None) -> str:
        """Signed with key `kid` (the first published by default); `header` adds to or overrides the JOSE header.
        The claims are signed as given, whatever their types (PyJWT's `encode` would refuse some)."""
        kid = kid or self.published[0]
        key, key_alg = self.private[kid]
        headers = {"typ": "JWT", "kid": kid, **(header or {})}
        return jwt.api_jws.encode(json.dumps(claims).encode(), key, algorithm=alg or key_alg, headers=headers)

    def github_token(self, audience: str, kid: str | None = None, **claims) -> str:
        return self.sign(github_claims(audience, iss=self.iss, **claims), kid, header={"x5t": GITHUB_X5T})

    def pod_token(self, audience: str, kid: str | None = None, **claims) -> str:
        return self.sign(pod_claims(audience, iss=self.iss, **claims), kid)


def github_claims(audience: str, iss: str = GITHUB_ISSUER, repository: str = "acme/evals", **overrides) -> dict:
    """What a GitHub Actions job's token says of a push to main (every value a string, as GitHub sends it)."""
    now = int(time.time())
    owner = repository.split("/")[0]
    ref = overrides.get("ref", "refs/heads/main")
    workflow_ref = f"{repository}/.github/workflows/evals.yml@{ref}"
    claims = {
        "jti": str(uuid.uuid4()),
        "sub": f"repo:{repository}:ref:{ref}",
        "aud": audience,
        "ref": ref,
        "sha": "d5f6e4bf9b6a6bc0e1c3a8d8a9f0b1c2d3e4f5a6",
        "repository": repository,
        "repository_owner": owner,
        "repository_owner_id": "65",
        "repository_visibility": "private",
        "repository_id": "35",
        "user_id": "78",
        "actor_id": "12",
        "actor": "octocat",
        "run_id": "4242424242",
        "run_number": "10",
        "run_attempt": "1",
        "runner_environment": "github-hosted",
        "workflow": "evals",
        "workflow_ref": workflow_ref,
        "workflow_sha": "d5f6e4bf9b6a6bc0e1c3a8d8a9f0b1c2d3e4f5a6",
        "job_workflow_ref": workflow_ref,
        "job_workflow_sha": "d5f6e4bf9b6a6bc0e1c3a8d8a9f0b1c2d3e4f5a6",
        "head_ref": "",
        "base_ref": "",
        "event_name": "push",
        "ref_type": "branch",
        "ref_protected": "true",
        "iss": iss,
        "nbf": now - 600,
        "exp": now + 300,
        "iat": now,
    }
    claims.update(overrides)
    return {name: value for name, value in claims.items() if value is not None}


def pod_claims(
    audience: str, iss: str = CLUSTER_ISSUER, namespace: str = "research", serviceaccount: str = "agent", **overrides
) -> dict:
    """What a projected service-account token of a pod says (bound to the pod and its node)."""
    now = int(time.time())
    claims = {
        "aud": [audience],
        "exp": now + 3600,
        "iat": now,
        "iss": iss,
        "jti": str(uuid.uuid4()),
        "kubernetes.io": {
            "namespace": namespace,
            "node": {"name": "node-1", "uid": "646e7c5e-32d6-4d42-9dbd-e504e6cbe6b1"},
            "pod": {"name": "agent-7f9c", "uid": "5e0bd49b-f040-43b0-99b7-22765a53f7f3"},
            "serviceaccount": {"name": serviceaccount, "uid": "14ee3fa4-a7e2-420f-9f9a-dbc4507c3798"},
        },
        "nbf": now,
        "sub": f"system:serviceaccount:{namespace}:{serviceaccount}",
    }
    claims.update(overrides)
    return {name: value for name, value in claims.items() if value is not None}


def unsigned(claims: dict, **header) -> str:
    """A token with `alg: none` and no signature, as an attacker would write it."""

    def part(value: dict) -> str:
        return base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=").decode()

    return f"{part({'alg': 'none', 'typ': 'JWT', **header})}.{part(claims)}."


class JwksServer:
    """The issuer's JWKS on http://127.0.0.1:PORT/jwks, counting fetches; also a GitHub runner's token
    endpoint at /token (?audience=…, with the runner's request token as bearer)."""

    def __init__(self, issuer: Issuer, request_token: str = "runner-request-token"):
        self.issuer = issuer
        self.request_token = request_token
        self.fetches = 0
        self.token_claims: dict = {}  # extra claims for the tokens /token hands out
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                if self.path == "/jwks":
                    server.fetches += 1
                    return self.answer(200, issuer.jwks())
                if self.path.startswith("/token?"):
                    return self.answer(*server.runner_token(self.path, self.headers.get("authorization", "")))
                return self.answer(404, {"message": "not found"})

            def answer(self, status: int, body: dict):
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.http.serve_forever, daemon=True)

    def runner_token(self, path: str, authorization: str) -> tuple[int, dict]:
        """GitHub's ACTIONS_ID_TOKEN_REQUEST_URL: a token for the audience asked, to the bearer of the request token."""
        if authorization != f"Bearer {self.request_token}":
            return 401, {"message": "bad request token"}
        audience = parse_qs(urlsplit(path).query).get("audience", [""])[0]
        return 200, {"value": self.issuer.github_token(audience, **self.token_claims)}

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http.server_address[1]}"

    def __enter__(self) -> "JwksServer":
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.http.shutdown()
        self.http.server_close()
