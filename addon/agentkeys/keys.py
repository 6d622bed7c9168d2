"""Issuing keys: a policy, a lifetime and a budget become a record in the ledger and a secret, once.

Keys are issued by a person (`agentkeys keys issue`), by a program with an issuer token, or by an
agent for its sub-agents: a child key is always a narrower copy of its parent's, carved out of it.
"""

import fnmatch
import json
from dataclasses import dataclass
from datetime import UTC, datetime

from pydantic import BaseModel, ConfigDict, Field

from agentkeys import credentials
from agentkeys.ledger import KeyRecord, Ledger, Refusal
from agentkeys.money import Usd, format_usd, remaining_phrase, usd_to_micros
from agentkeys.paths import path_glob_within
from agentkeys.policy import BudgetUsd, Duration, EndpointRule, IdenticalCalls, Policy, RateLimits, parse_budget
from agentkeys.seal import RecordSeal


@dataclass(frozen=True)
class IssuedKey:
    key: str  # the only time the secret exists outside the agent
    record: KeyRecord


def issue_key(
    ledger: Ledger,
    policy: Policy,
    ttl_seconds: int | None = None,
    budget_usd: float | None = None,
    name: str = "",
    *,
    seal: RecordSeal,
) -> IssuedKey:
    """Mint a key under `policy`, its record sealed for the proxies; `ttl_seconds` and `budget_usd`
    default to the policy's own, and its lifetime starts on the store's clock."""
    budget = policy.budget_usd if budget_usd is None else parse_budget(budget_usd)
    issued = new_key_record(policy, ttl_seconds or policy.ttl, budget, name or policy.name, ledger.now())
    issued = IssuedKey(issued.key, seal.sealed(issued.record))
    ledger.create_key(issued.record)
    return issued


def new_key_record(
    policy: Policy,
    ttl_seconds: float,
    budget_usd: float,
    name: str,
    now: float,
    parent: KeyRecord | None = None,
    identity_json: str | None = None,
) -> IssuedKey:
    """A fresh secret and the record that stands for it (not yet stored). A child carries its parent's
    identity (the job or pod its tree was minted for), so a sub-agent's spend is traced there too."""
    minted = credentials.mint()
    record = KeyRecord(
        key_id=minted.key_id, key_hash=minted.key_hash, name=name, policy_name=policy.name,
        policy_json=policy.model_dump_json(), created_at=now, expires_at=now + ttl_seconds,
        budget_micros=usd_to_micros(budget_usd),
        parent_id=parent.key_id if parent else None, depth=parent.depth + 1 if parent else 0,
        identity_json=parent.identity_json if parent else identity_json,
        account_id=parent.account_id if parent else None,  # a sub-agent spends from its parent's account too
    )  # fmt: skip
    return IssuedKey(minted.key, record)


class ChildRequest(BaseModel):
    """What an agent asks for when it mints a key for a sub-agent: only ever a narrower copy of its own."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=200)
    budget_usd: BudgetUsd
    ttl: Duration
    providers: list[str] | None = None
    endpoints: list[EndpointRule] | None = None
    models: list[str] | None = None
    unmetered_endpoints: list[EndpointRule] = Field(
        default_factory=list, description="the parent's unmetered endpoints the child needs; none unless asked for"
    )
    # Limits as tight as the parent's or tighter; those not given are the parent's. The child's calls count
    # against its parent's limits too (see `limits.Limiter`).
    rate_limits: RateLimits | None = None
    max_identical_calls: IdenticalCalls | None = None
    max_calls: int | None = Field(default=None, gt=0)


class ChildRefused(Exception):
    """A child key asked for more than its parent has; the message says which limit."""


def child_policy(parent: Policy, request: ChildRequest) -> Policy:
    """The parent's policy narrowed to the request; ChildRefused if the request widens anything."""
    providers = request.providers or parent.providers
    wider = [p for p in providers if p not in parent.providers]
    if wider:
        allowed = ", ".join(parent.providers)
        raise ChildRefused(f"providers {', '.join(wider)} are not allowed to the parent ({allowed})")
    endpoints = request.endpoints or parent.endpoints
    refuse_wider_endpoints("endpoints", endpoints, parent.endpoints)
    # Unmetered calls spend the provider's money with no hold: a child gets only those it asks for.
    refuse_wider_endpoints("unmetered_endpoints", request.unmetered_endpoints, parent.unmetered_endpoints)
    models = request.models or parent.models
    wider = [m for m in models if not any(glob_within(m, outer) for outer in parent.models)]
    if wider:
        raise ChildRefused(f"models {', '.join(wider)} are not within the parent's ({', '.join(parent.models)})")
    # Named for what it is, so that a refusal of the child names the rules it actually has.
    name = f"{parent.name}, narrowed for child key {request.name}"
    return parent.model_copy(
        update={"name": name, "providers": providers, "endpoints": endpoints, "models": models,
                "unmetered_endpoints": request.unmetered_endpoints,
                "budget_usd": request.budget_usd, "ttl": request.ttl, **child_limits(parent, request)}
    )  # fmt: skip


def child_limits(parent: Policy, request: ChildRequest) -> dict:
    """The child's rate limits and loop breaker: the parent's, tightened where the request asks."""
    asked = request.rate_limits or RateLimits()
    wider = asked.wider_than(parent.rate_limits)
    if wider:
        parents = ", ".join(f"{name} {getattr(parent.rate_limits, name)}" for name in wider)
        raise ChildRefused(f"rate_limits {', '.join(wider)} are wider than the parent's ({parents})")
    identical, outer = request.max_identical_calls, parent.max_identical_calls
    if identical and outer and not identical.within(outer):
        raise ChildRefused(f"max_identical_calls {identical} is wider than the parent's ({outer})")
    if request.max_calls and parent.max_calls and request.max_calls > parent.max_calls:
        raise ChildRefused(f"max_calls {request.max_calls} is more than the parent's ({parent.max_calls})")
    return {
        "rate_limits": parent.rate_limits.narrowed_by(asked),
        "max_identical_calls": identical or outer,
        "max_calls": request.max_calls or parent.max_calls,
    }


def refuse_wider_endpoints(field: str, asked: list[EndpointRule], parents: list[EndpointRule]) -> None:
    wider = [str(rule) for rule in asked if not any(rule_within(rule, outer) for outer in parents)]
    if wider:
        allowed = ", ".join(str(rule) for rule in parents) or "none"
        raise ChildRefused(f"{field} {', '.join(wider)} are not within the parent's ({allowed})")


def rule_within(rule: EndpointRule, outer: EndpointRule) -> bool:
    return outer.method in ("*", rule.method) and path_glob_within(rule.path, outer.path)


def glob_within(inner: str, outer: str) -> bool:
    """Whether every model name `inner` matches, `outer` matches too (decided conservatively: False when unsure)."""
    if inner == outer or not has_wildcard(inner):
        return inner == outer or fnmatch.fnmatchcase(inner, outer)
    prefix_inner, prefix_outer = inner[:-1], outer[:-1]
    return (
        inner.endswith("*") and outer.endswith("*")
        and not has_wildcard(prefix_inner) and not has_wildcard(prefix_outer)
        and prefix_inner.startswith(prefix_outer)
    )  # fmt: skip


def has_wildcard(pattern: str) -> bool:
    return any(char in pattern for char in "*?[")


def check_depth_and_lifetime(parent: KeyRecord, policy: Policy, request: ChildRequest, now: float) -> None:
    if parent.depth + 1 > policy.max_child_depth:
        raise ChildRefused(
            f"max_child_depth: policy {policy.name} allows {policy.max_child_depth} level(s) of child keys"
            f" and this key is at depth {parent.depth}"
        )
    if now + request.ttl > parent.expires_at:
        raise ChildRefused(
            f"ttl: {request.ttl}s would outlive the parent, which expires at {iso(parent.expires_at)}"
            f" ({int(parent.expires_at - now)}s from now)"
        )


def child_refusal_message(refusal: Refusal, parent: KeyRecord, request: ChildRequest) -> str:
    if refusal is Refusal.BUDGET:
        asked = format_usd(usd_to_micros(request.budget_usd))
        return f"budget_usd: asked {asked}; of the parent's budget {remaining_phrase(parent.remaining_micros)}"
    if refusal is Refusal.TOO_MANY_CHILDREN:
        return f"max_children: key {parent.key_id} has as many live child keys as its policy allows"
    return f"the parent key is {refusal.value}"


def describe(record: KeyRecord, now: float) -> dict:
    """A key as the CLI and the control API show it: never its secret or its hash.

    A key that can no longer spend (revoked or expired) has nothing remaining, whatever is unspent.
    Amounts are `Usd`, to the micro-dollar: write them with `money.dumps` (never `5e-06`).
    """
    status = record.status(now)
    return {
        "id": record.key_id,
        "name": record.name,
        "policy": record.policy_name,
        "parent_id": record.parent_id,
        "status": status,
        "created_at": iso(record.created_at),
        "expires_at": iso(record.expires_at),
        "budget_usd": Usd(record.budget_micros),
        "spent_usd": Usd(record.spent_micros),
        "held_usd": Usd(record.held_micros),
        "remaining_usd": Usd(record.remaining_micros if status == "active" else 0),
        "identity": json.loads(record.identity_json) if record.identity_json else None,  # a keyless key's job or pod
        "account_id": record.account_id,
    }


def iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="seconds")
