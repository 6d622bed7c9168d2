"""The proxy's own API, under /_agentkeys/v1/, for programs rather than people.

    POST /_agentkeys/v1/keys       with an agent key: mint a child key for a sub-agent, carved out of
                                   the caller's budget; with an issuer token: mint a key from a policy;
                                   with an OIDC token (a JWT): mint the key its identity rule gives
    GET  /_agentkeys/v1/keys/self  the calling key: expiry, budget, spend, what it may call, its children
    DELETE /_agentkeys/v1/keys/self        revoke the calling key (and its descendants): "I am done"
    DELETE /_agentkeys/v1/keys/{child_id}  revoke one of the calling key's children (and its descendants)

These routes are answered by the proxy on either listener and never reach a provider. Plain async
code over the store's door (no mitmproxy here); each answer is audited by the addon.
"""

import logging
import os
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, ValidationError

from agentkeys import credentials
from agentkeys.auth import Authenticator
from agentkeys.calls import CallRequest, Denial
from agentkeys.identity import ExchangeRefused, Identities, presented_jwt
from agentkeys.jwks import KeysUnavailable
from agentkeys.keys import (
    ChildRefused,
    ChildRequest,
    IssuedKey,
    check_depth_and_lifetime,
    child_policy,
    child_refusal_message,
    describe,
    new_key_record,
)
from agentkeys.ledger import KeyRecord
from agentkeys.money import format_usd, usd_to_micros
from agentkeys.policy import BudgetUsd, Duration, Policy, ProxyConfig, load_policy, parse_stored_policy
from agentkeys.store import Store

log = logging.getLogger(__name__)

PREFIX = "/_agentkeys/"


@dataclass(frozen=True)
class ControlAnswer:
    status: int
    body: dict
    reason: str
    key: KeyRecord | None = None
    identity: dict | None = None  # who an OIDC token verified as, for the audit record of a refused exchange


@dataclass(frozen=True)
class Issuer:
    """A program allowed to mint keys remotely (a CI system), and the policies it may mint from."""

    name: str
    token: str
    policies: dict[str, Policy]


class IssueRequest(BaseModel):
    """An issuer's request: a policy by name, narrowed at most to its own ttl and budget."""

    model_config = ConfigDict(extra="forbid")
    policy: str
    name: str = ""
    ttl: Duration | None = None
    budget_usd: BudgetUsd | None = None


def is_control_path(path: str) -> bool:
    return path.startswith(PREFIX)


class Control:
    def __init__(
        self, store: Store, auth: Authenticator, issuers: list[Issuer], identities: Identities | None = None
    ):
        self.store = store
        self.auth = auth
        self.issuers = issuers
        self.identities = identities or Identities([])  # no trusted OIDC issuer: every token is refused (iss)

    async def handle(self, call: CallRequest) -> ControlAnswer:
        """The answer to a call; every refusal, raised by whichever step made it, is turned into one here."""
        try:
            return await self.answer(call)
        except Refused as refused:
            return refused.answer()

    async def answer(self, call: CallRequest) -> ControlAnswer:
        if (call.method, call.path) == ("GET", "/_agentkeys/v1/keys/self"):
            return await self.show_self(call)
        if (call.method, call.path) == ("POST", "/_agentkeys/v1/keys"):
            if issuer := self.issuer_of(call):
                return await self.issue_for(issuer, call)
            if token := presented_jwt(call.headers):
                return await self.exchange(token, call)
            if not carries_agent_key(call):
                raise Refused(401, "agentkeys: the credential sent is not an agent key or issuer token")
            return await self.mint_child(call)
        if call.method == "DELETE" and call.path.startswith("/_agentkeys/v1/keys/"):
            return await self.revoke(call, call.path.removeprefix("/_agentkeys/v1/keys/"))
        raise Refused(
            404, f"no such route: {call.method} {call.path} (see /_agentkeys/v1/keys, /_agentkeys/v1/keys/self)"
        )

    async def caller(self, call: CallRequest) -> KeyRecord:
        """The calling agent key, read afresh from the store (it may have been revoked a moment ago)."""
        try:
            return await self.auth.caller(call, fresh=True)
        except Denial as denial:
            raise Refused(401, denial.message, denial.key) from None

    # ----- self -----

    async def show_self(self, call: CallRequest) -> ControlAnswer:
        record = await self.caller(call)
        children = await self.store.children(record.key_id)
        policy = parse_stored_policy(record.policy_json)
        now = self.store.clock()
        body = {
            **describe(record, now),
            "providers": policy.providers,
            "endpoints": [str(rule) for rule in policy.endpoints],
            "unmetered_endpoints": [str(rule) for rule in policy.unmetered_endpoints],
            "models": policy.models,
            "rate_limits": policy.rate_limits.model_dump(exclude_none=True),
            "max_identical_calls": str(policy.max_identical_calls) if policy.max_identical_calls else None,
            "max_calls": policy.max_calls,
            "children": [describe(child, now) for child in children],
        }
        return ControlAnswer(200, body, "self", record)

    async def revoke(self, call: CallRequest, target: str) -> ControlAnswer:
        caller = await self.caller(call)
        key_id = caller.key_id if target == "self" else target
        if key_id != caller.key_id:
            target_record = await self.store.key(key_id)
            if target_record is None or target_record.parent_id != caller.key_id:
                raise Refused(404, f"agentkeys: {key_id} is not a child of this key", caller)
        await self.store.revoke(key_id)
        return ControlAnswer(200, {"id": key_id, "status": "revoked"}, f"revoked {key_id}", caller)

    # ----- child keys -----

    async def mint_child(self, call: CallRequest) -> ControlAnswer:
        parent = await self.caller(call)
        try:
            request = ChildRequest.model_validate_json(call.body)
        except ValidationError as e:
            raise Refused(400, f"agentkeys: bad child key request: {validation_message(e)}", parent) from None
        parent_policy = parse_stored_policy(parent.policy_json)
        now = self.store.clock()
        try:
            policy = child_policy(parent_policy, request)
            check_depth_and_lifetime(parent, parent_policy, request, now)
        except ChildRefused as refused:
            raise Refused(403, f"agentkeys: child key refused: {refused}", parent) from None
        issued = new_key_record(policy, request.ttl, request.budget_usd, request.name, now, parent)
        refusal = await self.store.create_child(issued.record, parent_policy.max_children)
        if refusal is not None:
            raise Refused(
                403, f"agentkeys: child key refused: {child_refusal_message(refusal, parent, request)}", parent
            )
        return created(issued, now, parent)

    # ----- issuers -----

    def issuer_of(self, call: CallRequest) -> Issuer | None:
        presented = credentials.credentials_in(call.headers)
        return next(
            (issuer for issuer in self.issuers for token in presented if credentials.same_secret(token, issuer.token)),
            None,
        )

    async def issue_for(self, issuer: Issuer, call: CallRequest) -> ControlAnswer:
        try:
            request = IssueRequest.model_validate_json(call.body)
        except ValidationError as e:
            raise Refused(400, f"agentkeys: bad key request: {validation_message(e)}") from None
        policy = issuer.policies.get(request.policy)
        if policy is None:
            allowed = ", ".join(sorted(issuer.policies))
            raise Refused(
                403, f"agentkeys: issuer {issuer.name} may not issue policy {request.policy} (allowed: {allowed})"
            )
        if request.ttl and request.ttl > policy.ttl:
            raise Refused(403, f"agentkeys: ttl {request.ttl}s exceeds policy {policy.name}'s {policy.ttl}s")
        if request.budget_usd and request.budget_usd > policy.budget_usd:
            raise Refused(
                403,
                f"agentkeys: budget {format_usd(usd_to_micros(request.budget_usd))} exceeds policy {policy.name}'s"
                f" {format_usd(usd_to_micros(policy.budget_usd))}",
            )
        now = self.store.clock()
        issued = new_key_record(
            policy, request.ttl or policy.ttl, request.budget_usd or policy.budget_usd,
            request.name or f"{issuer.name}: {policy.name}", now,
        )  # fmt: skip
        await self.store.create_key(issued.record)
        return created(issued, now)

    # ----- OIDC tokens (keyless issuance) -----

    async def exchange(self, token: str, call: CallRequest) -> ControlAnswer:
        try:
            issued = await self.identities.exchange(token, call.body, self.store)
        except ExchangeRefused as refused:
            raise Refused(refused.status, refused.message, code=refused.check, identity=refused.identity) from None
        except KeysUnavailable as e:
            raise Refused(503, f"agentkeys: {e}; try again shortly", code="jwks") from None
        return created(issued, self.store.clock())


def carries_agent_key(call: CallRequest) -> bool:
    """Whether the call presents something meant as an agent key (well-formed or not): it is then told
    what is wrong with that key, not that issuers' tokens are also taken."""
    presented = credentials.credentials_in(call.headers) + credentials.credentials_in_query(call.query)
    return any(credential.startswith(credentials.PREFIX) for credential in [*presented, call.tunnel_credential or ""])


def issuers_from(config: ProxyConfig) -> list[Issuer]:
    """The issuers whose token is set in the environment, with the policies each may issue from."""
    issuers = []
    for name, spec in config.issuers.items():
        token = os.environ.get(spec.token_env)
        if not token:
            log.warning("agentkeys: issuer %s has no token (%s is not set); it cannot issue keys", name, spec.token_env)
            continue
        policies = [load_policy(config.path(path)) for path in spec.policies]
        issuers.append(Issuer(name, token, {policy.name: policy for policy in policies}))
    return issuers


def created(issued: IssuedKey, now: float, parent: KeyRecord | None = None) -> ControlAnswer:
    body = {**describe(issued.record, now), "key": issued.key}
    return ControlAnswer(201, body, f"issued key {issued.record.key_id}", parent or issued.record)


class Refused(Exception):
    """A control call refused: its status, what the caller is told, and the key it was made with."""

    KINDS = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error", 404: "not_found"}

    def __init__(
        self,
        status: int,
        message: str,
        key: KeyRecord | None = None,
        code: str | None = None,  # which check refused an OIDC token (`aud`, `exp`, `replay`…)
        identity: dict | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.key = status, message, key
        self.code, self.identity = code, identity

    def answer(self) -> ControlAnswer:
        error = {"message": self.message, "type": self.KINDS.get(self.status, "error")}
        body = {"error": {**error, "code": self.code} if self.code else error}
        return ControlAnswer(self.status, body, self.message, self.key, self.identity)


def validation_message(error: ValidationError) -> str:
    return "; ".join(f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in error.errors())
