"""Keyless issuance: a job or a pod proves who it is with an OIDC token and gets a key, with no secret to leak.

    verify the token (its issuer's key, audience, lifetime) → the first rule its claims match →
    claim its jti in the store (one key per token) → a key under the rule's policy, no longer-lived than
    the token and no richer than the rule

The trusted issuers and their rules are the config's `identity` section (GitHub Actions, a Kubernetes
cluster's service-account issuer, any OIDC issuer). The token rides as the bearer of
`POST /_agentkeys/v1/keys`, told from an agent key or an issuer token by its shape (see `looks_like_jwt`).
Verification is PyJWT's, with the algorithm taken from the issuer's key, never from the token.
Every refusal says which check failed: `ExchangeRefused.check`.
"""

import fnmatch
import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

import jwt
from jwt import exceptions
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from agentkeys import credentials
from agentkeys.jwks import ASYMMETRIC_ALGORITHMS, KeySet, SigningKey
from agentkeys.keys import IssuedKey, iso, new_key_record
from agentkeys.money import format_usd, usd_to_micros
from agentkeys.policy import Duration, IdentityConfig, IdentityRule, Policy, ProxyConfig, load_policy
from agentkeys.store import Store
from agentkeys.yamlfile import ConfigError

LEEWAY_SECONDS = 60  # clock skew allowed between the issuer and this proxy, on exp, nbf and iat
MAX_TOKEN_CHARS = 16 * 1024
MAX_JTI_CHARS = 256
# A JWS in compact form: base64url header and payload, and a signature (empty when `alg` is none).
JWT_SHAPE = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")
SERVICE_ACCOUNT_SUBJECT = re.compile(r"system:serviceaccount:([^:]+):([^:]+)")
# What a key records of the token it was minted for (when the token has it): enough to trace its spend to
# one job (GitHub Actions) or one pod (Kubernetes).
RECORDED_CLAIMS = (
    "sub", "repository", "repository_owner", "ref", "sha", "workflow", "workflow_ref", "job_workflow_ref",
    "run_id", "run_number", "run_attempt", "actor", "event_name", "environment",
    "namespace", "serviceaccount", "pod", "node",
)  # fmt: skip
# PyJWT's refusals (PyJWT 2.10 and later), by the check that failed; the first match wins
# (InvalidSignatureError is a DecodeError).
CHECKS = (
    (exceptions.InvalidSignatureError, "signature"),
    (exceptions.ExpiredSignatureError, "exp"),
    (exceptions.ImmatureSignatureError, "nbf"),
    (exceptions.InvalidAudienceError, "aud"),
    (exceptions.InvalidIssuerError, "iss"),
    (exceptions.InvalidIssuedAtError, "iat"),
    (exceptions.InvalidAlgorithmError, "alg"),
    (exceptions.InvalidKeyError, "alg"),
    (exceptions.InvalidJTIError, "jti"),
    (exceptions.InvalidSubjectError, "sub"),
    (exceptions.PyJWTError, "malformed"),
)


class ExchangeRefused(Exception):
    """No key for this token: which check failed (`aud`, `exp`, `replay`, `rule`…), and why, in words."""

    def __init__(self, check: str, message: str, status: int = 401, identity: dict | None = None):
        super().__init__(message)
        self.check = check
        self.message = f"agentkeys: token refused ({check}): {message}"
        self.status = status
        self.identity = identity  # who the token verified as, when the refusal came after verifying it


class ExchangeRequest(BaseModel):
    """What a token's bearer may ask for: a name, one of the policies its rules give, and less than its rule
    gives (never more)."""

    model_config = ConfigDict(extra="forbid")
    policy: str | None = Field(default=None, description="by name; default the first matching rule's")
    name: str = Field(default="", max_length=200)
    ttl: Duration | None = None
    budget_usd: float | None = Field(default=None, gt=0)


@dataclass(frozen=True)
class TrustedIssuer:
    name: str
    config: IdentityConfig
    keys: KeySet
    rules: list[tuple[IdentityRule, Policy]]


@dataclass(frozen=True)
class VerifiedToken:
    issuer: TrustedIssuer
    claims: dict
    token_id: str  # its jti, or a digest of the whole token when it has none: either way, used once
    expires_at: float

    def facts(self) -> dict[str, str]:
        return claim_facts(self.claims)

    def identity(self) -> dict:
        """What the key will record of this token (see RECORDED_CLAIMS)."""
        facts = self.facts()
        recorded = {name: facts[name] for name in RECORDED_CLAIMS if name in facts}
        return {"issuer": self.issuer.name, "iss": self.issuer.config.issuer, "jti": self.token_id, **recorded}


def looks_like_jwt(credential: str) -> bool:
    return JWT_SHAPE.fullmatch(credential) is not None


def presented_jwt(headers: dict[str, str]) -> str | None:
    """The OIDC token a request carries as its credential, if it carries one."""
    return next((found for found in credentials.credentials_in(headers) if looks_like_jwt(found)), None)


def claim_facts(claims: dict) -> dict[str, str]:
    """The claims a rule can match, as strings: the token's own string claims, with a Kubernetes token's
    namespace, service account, pod and node lifted out of `kubernetes.io` (or, failing that, its `sub`)."""
    facts = {name: value for name, value in claims.items() if isinstance(value, str)}
    kubernetes = claims.get("kubernetes.io")
    if isinstance(kubernetes, dict):
        lifted = {
            "namespace": kubernetes.get("namespace"),
            "serviceaccount": name_of(kubernetes.get("serviceaccount")),
            "pod": name_of(kubernetes.get("pod")),
            "node": name_of(kubernetes.get("node")),
        }
        facts.update({name: value for name, value in lifted.items() if isinstance(value, str)})
    elif subject := SERVICE_ACCOUNT_SUBJECT.fullmatch(facts.get("sub", "")):
        facts["namespace"], facts["serviceaccount"] = subject.groups()
    return facts


def name_of(value) -> str | None:
    return value.get("name") if isinstance(value, dict) else None


def matches(rule: IdentityRule, facts: dict[str, str]) -> bool:
    """Every claim the rule names is present and matches one of its globs."""
    return all(
        name in facts and any(fnmatch.fnmatchcase(facts[name], glob) for glob in globs)
        for name, globs in rule.match.conditions().items()
    )


class Identities:
    """The trusted issuers, and the exchange of their tokens for keys."""

    def __init__(self, issuers: list[TrustedIssuer]):
        self.issuers = issuers

    async def exchange(self, token: str, body: bytes, store: Store) -> IssuedKey:
        """A key for the bearer of `token`, stored; ExchangeRefused saying which check failed."""
        verified = await self.verify(token)
        request = exchange_request(body)
        rule, policy = self.rule_for(verified, request.policy)
        now = store.clock()
        budget_usd, ttl = self.size(verified, rule, policy, request, now)
        claimed = await store.claim_token(
            verified.issuer.config.issuer, verified.token_id, verified.expires_at + LEEWAY_SECONDS
        )
        if not claimed:
            raise ExchangeRefused(
                "replay",
                f"token {shown(verified.token_id)} was exchanged for a key already",
                identity=verified.identity(),
            )
        identity = verified.identity()
        name = request.name or default_name(verified.issuer.name, identity)
        issued = new_key_record(policy, ttl, budget_usd, name, now, identity_json=json.dumps(identity))
        await store.create_key(issued.record)
        return issued

    # ----- verify -----

    async def verify(self, token: str) -> VerifiedToken:
        header, unverified = read_unverified(token)
        issuer = self.issuer_of(unverified)
        key = await signing_key_of(issuer, header)
        claims = decode(token, key, issuer, unverified)
        return VerifiedToken(issuer, claims, token_id(token, claims), float(claims["exp"]))

    def issuer_of(self, unverified: dict) -> TrustedIssuer:
        """The trusted issuer the token names (of several with its `iss`, the one of its audience)."""
        iss = unverified.get("iss")
        candidates = [issuer for issuer in self.issuers if issuer.config.issuer == iss]
        if not candidates:
            trusted = ", ".join(sorted({issuer.config.issuer for issuer in self.issuers})) or "none configured"
            raise ExchangeRefused("iss", f"issuer {shown(iss)} is not trusted here (trusted: {trusted})")
        audiences = audiences_of(unverified)
        return next((issuer for issuer in candidates if issuer.config.audience in audiences), candidates[0])

    # ----- rules -----

    def rule_for(self, verified: VerifiedToken, policy_name: str | None) -> tuple[IdentityRule, Policy]:
        """The first rule the token's claims match (of those giving `policy_name`, when the bearer names one)."""
        facts = verified.facts()
        matching = [(rule, policy) for rule, policy in verified.issuer.rules if matches(rule, facts)]
        chosen = [(rule, policy) for rule, policy in matching if policy_name in (None, policy.name)]
        if chosen:
            return chosen[0]
        if matching:
            given = ", ".join(sorted({policy.name for _, policy in matching}))
            raise ExchangeRefused(
                "policy", f"no rule gives this token policy {shown(policy_name)} (it may get: {given})", 403,
                identity=verified.identity(),
            )  # fmt: skip
        named = sorted({name for rule, _ in verified.issuer.rules for name in rule.match.conditions()})
        seen = ", ".join(f"{name}={shown(facts[name])}" for name in named if name in facts) or "none of them"
        raise ExchangeRefused(
            "rule",
            f"no rule of {verified.issuer.name} matches this token (its {', '.join(named)}: {seen})",
            identity=verified.identity(),
        )

    def size(
        self, verified: VerifiedToken, rule: IdentityRule, policy: Policy, request: ExchangeRequest, now: float
    ) -> tuple[float, float]:
        """The key's budget and lifetime: what the rule gives (else the policy), lowered by the request, and
        never past the token's own expiry."""
        budget_ceiling = rule.budget_usd or policy.budget_usd
        ttl_ceiling = rule.ttl or policy.ttl
        if request.budget_usd and request.budget_usd > budget_ceiling:
            raise ExchangeRefused(
                "budget",
                f"asked {format_usd(usd_to_micros(request.budget_usd))}, the rule gives at most"
                f" {format_usd(usd_to_micros(budget_ceiling))}",
                403,
            )
        if request.ttl and request.ttl > ttl_ceiling:
            raise ExchangeRefused("ttl", f"asked {request.ttl}s, the rule gives at most {ttl_ceiling}s", 403)
        lifetime = min(request.ttl or ttl_ceiling, verified.expires_at - now)
        if lifetime <= 0:
            raise ExchangeRefused("exp", f"the token expired at {iso(verified.expires_at)}: no lifetime is left")
        return request.budget_usd or budget_ceiling, lifetime


def read_unverified(token: str) -> tuple[dict, dict]:
    """The header and claims as written, to find the issuer and its key; nothing here is trusted yet."""
    if len(token) > MAX_TOKEN_CHARS:
        raise ExchangeRefused("malformed", f"the token is longer than {MAX_TOKEN_CHARS} characters")
    try:
        return jwt.get_unverified_header(token), jwt.decode(token, options={"verify_signature": False})
    except jwt.PyJWTError as e:
        raise ExchangeRefused("malformed", f"not a JWT: {e}") from None


async def signing_key_of(issuer: TrustedIssuer, header: dict) -> SigningKey:
    """The issuer's key the token names, if the token's algorithm is the one that key signs with."""
    alg, kid = header.get("alg"), header.get("kid")
    if not isinstance(alg, str) or alg.lower() == "none":
        raise ExchangeRefused("alg", f"the token is not signed (alg {shown(alg)})")
    if alg not in ASYMMETRIC_ALGORITHMS:
        raise ExchangeRefused("alg", f"alg {shown(alg)} is not a public-key signature algorithm")
    if kid is not None and not isinstance(kid, str):
        raise ExchangeRefused("kid", f"kid must be a string, not {type(kid).__name__}")
    key = await issuer.keys.key_for(kid)
    if key is None:
        failed = f" (the last refresh failed: {issuer.keys.last_error})" if issuer.keys.last_error else ""
        raise ExchangeRefused("kid", f"{issuer.name} has no key {shown(kid)}, even after refreshing its keys{failed}")
    if key.algorithm != alg:
        raise ExchangeRefused("alg", f"the token says {alg}, but key {shown(key.kid)} signs with {key.algorithm}")
    return key


def decode(token: str, key: SigningKey, issuer: TrustedIssuer, unverified: dict) -> dict:
    """The token's claims, once its signature, issuer, audience and lifetime check out (PyJWT's checks)."""
    config = issuer.config
    try:
        claims = jwt.decode(
            token, key.key, algorithms=[key.algorithm], audience=config.audience, issuer=config.issuer,
            leeway=LEEWAY_SECONDS, options={"require": ["exp", "iss", "aud"]},
        )  # fmt: skip
    except jwt.MissingRequiredClaimError as e:
        raise ExchangeRefused(e.claim, f"the token has no {e.claim} claim") from None
    except jwt.PyJWTError as e:
        check = next(check for kind, check in CHECKS if isinstance(e, kind))
        raise ExchangeRefused(check, explain(check, e, unverified, config)) from None
    jti = claims.get("jti")
    if jti is not None and not (isinstance(jti, str) and 0 < len(jti) <= MAX_JTI_CHARS):
        raise ExchangeRefused("jti", f"jti must be a string of 1 to {MAX_JTI_CHARS} characters")
    return claims


def explain(check: str, error: jwt.PyJWTError, claims: dict, config: IdentityConfig) -> str:
    """PyJWT's reason, in this proxy's terms where it helps the caller fix the token."""
    if check == "aud":
        return f"the token is for audience {shown(claims.get('aud'))}, this proxy expects {config.audience!r}"
    if check == "exp":
        return f"the token expired at {iso(float(claims['exp']))} (allowing {LEEWAY_SECONDS} s of clock skew)"
    if check == "nbf":
        return f"the token is not valid yet (allowing {LEEWAY_SECONDS} s of clock skew): {error}"
    if check == "signature":
        return "the signature does not verify with the issuer's key"
    return str(error)


def audiences_of(claims: dict) -> list:
    aud = claims.get("aud")
    return [aud] if isinstance(aud, str) else aud if isinstance(aud, list) else []


def token_id(token: str, claims: dict) -> str:
    jti = claims.get("jti")
    return jti if isinstance(jti, str) else "sha256:" + hashlib.sha256(token.encode()).hexdigest()


def exchange_request(body: bytes) -> ExchangeRequest:
    if not body.strip():
        return ExchangeRequest()
    try:
        return ExchangeRequest.model_validate_json(body)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, err['loc'])) or 'body'}: {err['msg']}" for err in e.errors())
        raise ExchangeRefused("request", f"bad key request: {problems}", 400) from None


def default_name(issuer: str, identity: dict) -> str:
    """Say `github: acme/evals run 42` or `cluster: research/agent pod agent-7f9c`."""
    if "repository" in identity:
        run = f" run {identity['run_id']}" if "run_id" in identity else ""
        return f"{issuer}: {identity['repository']}{run}"
    if "namespace" in identity and "serviceaccount" in identity:
        pod = f" pod {identity['pod']}" if "pod" in identity else ""
        return f"{issuer}: {identity['namespace']}/{identity['serviceaccount']}{pod}"
    return f"{issuer}: {identity.get('sub', 'token')}"


def shown(value, limit: int = 120) -> str:
    """A value from an unverified token, quoted and cut short, for a message or the audit log."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def identities_from(config: ProxyConfig) -> Identities:
    """The config's trusted issuers, their rules' policies loaded, and a key file read now (so a bad one stops
    the proxy at start-up rather than refusing every token later)."""
    issuers = []
    for name, spec in config.identity.items():
        source = spec.jwks_url or config.path(spec.jwks_file)
        keys = KeySet(source)
        if isinstance(source, Path):
            try:
                keys.load_now()
            except (OSError, ValueError) as e:
                raise ConfigError([f"{source}: identity.{name}.jwks_file: {e}"]) from None
        rules = [(rule, load_policy(config.path(rule.policy))) for rule in spec.rules]
        issuers.append(TrustedIssuer(name, spec, keys, rules))
    return Identities(issuers)
